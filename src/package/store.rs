//! Writing packages: atomically (a temporary sibling directory renamed into place), keeping the
//! replaced version under `previous/` and carrying the driver profiles under `drivers/` across
//! every rewrite; putting the previous version back (`pe-clip calibrate --rollback`).

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{sha256_hex, FileSum, Manifest, Package, DRIVERS_DIR, MANIFEST_FILE, PREVIOUS_DIR};
use crate::error::{Error, Result};

/// Write a package directory atomically: the files go to a temporary sibling directory, which
/// is renamed into place. An existing package at `dir` is replaced; it is kept under `previous/`
/// (one version: its own `previous/` is dropped; a damaged one is not kept) for
/// `pe-clip calibrate --rollback`, and its driver profiles are carried over. Any other non-empty
/// directory is refused. `manifest.checksums` is filled in here.
pub fn write_package(dir: &Path, manifest: Manifest, files: &[(&str, &[u8])]) -> Result<()> {
    write_package_with(dir, manifest, files, false)
}

/// [`write_package`] for a change that is not a new version of the model (e.g. a new neutral
/// reference): the existing `previous/` is carried over unchanged.
pub fn write_package_carrying_previous(
    dir: &Path,
    manifest: Manifest,
    files: &[(&str, &[u8])],
) -> Result<()> {
    write_package_with(dir, manifest, files, true)
}

/// The regular files directly under `dir/sub`, as (`sub/name`, bytes).
fn files_under(dir: &Path, sub: &str) -> Result<Vec<(String, Vec<u8>)>> {
    let d = dir.join(sub);
    let mut out = Vec::new();
    if !d.is_dir() {
        return Ok(out);
    }
    for e in std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))? {
        let e = e.map_err(|e| Error::io(&d, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !e.path().is_file() {
            continue;
        }
        let bytes = std::fs::read(e.path()).map_err(|err| Error::io(e.path(), err))?;
        out.push((format!("{sub}/{name}"), bytes));
    }
    out.sort();
    Ok(out)
}

fn write_package_with(
    dir: &Path,
    mut manifest: Manifest,
    files: &[(&str, &[u8])],
    carry_previous: bool,
) -> Result<()> {
    check_replaceable(dir)?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "package".into());
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.tmp-"))
        .tempdir_in(&parent)
        .map_err(|e| Error::io(&parent, e))?;
    for (rel, bytes) in &carried_files(dir, carry_previous)? {
        let path = tmp.path().join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        write_synced(&path, bytes)?;
    }
    manifest.checksums.clear();
    for (file, bytes) in files {
        let path = tmp.path().join(file);
        write_synced(&path, bytes)?;
        manifest.checksums.push(FileSum {
            file: (*file).to_string(),
            bytes: bytes.len() as u64,
            sha256: sha256_hex(bytes),
        });
    }
    let json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| Error::package(dir, format!("cannot serialise the manifest: {e}")))?;
    write_synced(&tmp.path().join(MANIFEST_FILE), &json)?;
    swap_in(
        tmp.keep(),
        dir,
        &parent.join(format!(".{name}.old-{}", std::process::id())),
    )
}

/// A package may be written over an existing package or into a new or empty directory only.
fn check_replaceable(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let is_package = dir.join(MANIFEST_FILE).is_file();
    let empty = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .next()
        .is_none();
    if !is_package && !empty {
        return Err(Error::package(
            dir,
            "exists and is not a pe-clip package; give a new or empty directory",
        ));
    }
    Ok(())
}

/// What the new version takes over from the package at `dir`: its `drivers/`, and either its
/// `previous/` (`carry_previous`: a rollback) or the current version itself as `previous/` (when
/// it verifies).
fn carried_files(dir: &Path, carry_previous: bool) -> Result<Vec<(String, Vec<u8>)>> {
    let mut extra = Vec::new();
    if !dir.join(MANIFEST_FILE).is_file() {
        return Ok(extra);
    }
    extra.extend(files_under(dir, DRIVERS_DIR)?);
    if carry_previous {
        extra.extend(files_under(dir, PREVIOUS_DIR)?);
        return Ok(extra);
    }
    match Package::open(dir) {
        Ok(current) => {
            let mpath = dir.join(MANIFEST_FILE);
            extra.push((
                format!("{PREVIOUS_DIR}/{MANIFEST_FILE}"),
                std::fs::read(&mpath).map_err(|e| Error::io(&mpath, e))?,
            ));
            for c in &current.manifest.checksums {
                let p = dir.join(&c.file);
                extra.push((
                    format!("{PREVIOUS_DIR}/{}", c.file),
                    std::fs::read(&p).map_err(|e| Error::io(&p, e))?,
                ));
            }
        }
        Err(e) => log::warn!("the package being replaced is not kept: {e}"),
    }
    Ok(extra)
}

/// Put the complete directory `tmp` in place of `dir`: move an existing package aside to `old`,
/// rename `tmp` to `dir`, then drop `old` (on failure the old package is moved back).
fn swap_in(tmp: PathBuf, dir: &Path, old: &Path) -> Result<()> {
    let old = if dir.exists() {
        std::fs::rename(dir, old).map_err(|e| Error::io(dir, e))?;
        Some(old)
    } else {
        None
    };
    if let Err(e) = std::fs::rename(&tmp, dir) {
        if let Some(old) = old {
            let _ = std::fs::rename(old, dir);
        }
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(Error::io(dir, e));
    }
    if let Some(old) = old {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

/// What `rollback` did.
#[derive(Debug, Clone, Serialize)]
pub struct RollbackReport {
    pub package: PathBuf,
    /// SHA-256 of the model now in place and of the one moved to `previous/`.
    pub restored_model_sha256: String,
    pub replaced_model_sha256: Option<String>,
}

/// Put the package's `previous/` version back in place; the current one becomes `previous/`
/// (a second rollback undoes the first). A damaged current package is simply replaced.
pub fn rollback(dir: &Path) -> Result<RollbackReport> {
    let prev_dir = dir.join(PREVIOUS_DIR);
    if !prev_dir.join(MANIFEST_FILE).is_file() {
        return Err(Error::package(
            dir,
            "has no previous version to roll back to (previous/ is written by `pe-clip calibrate`)",
        ));
    }
    let previous = Package::open(&prev_dir)?;
    let mut files = Vec::new();
    for c in &previous.manifest.checksums {
        let p = prev_dir.join(&c.file);
        files.push((
            c.file.clone(),
            std::fs::read(&p).map_err(|e| Error::io(&p, e))?,
        ));
    }
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(f, b)| (f.as_str(), b.as_slice()))
        .collect();
    let restored = previous.model_sha256().to_string();
    let replaced = match Package::open(dir) {
        Ok(current) => Some(current.model_sha256().to_string()),
        Err(e) => {
            log::warn!("the current package is damaged ({e}); replacing it without keeping it");
            None
        }
    };
    write_package(dir, previous.manifest.clone(), &refs)?;
    Ok(RollbackReport {
        package: dir.to_path_buf(),
        restored_model_sha256: restored,
        replaced_model_sha256: replaced,
    })
}

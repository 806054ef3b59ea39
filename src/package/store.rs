//! Writing packages crash-safely (a complete, synced temporary sibling directory swapped into
//! place in one atomic exchange), keeping the replaced version under `previous/` and carrying
//! the driver profiles under `drivers/` across every rewrite; putting the previous version back
//! (`pe-clip calibrate --rollback`). docs/reliability.md states the guarantee and its tests.

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

/// The regular files directly under `dir/sub` (each at most `limit` bytes), as (`sub/name`,
/// bytes).
fn files_under(dir: &Path, sub: &str, limit: u64) -> Result<Vec<(String, Vec<u8>)>> {
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
        let bytes = super::read_package_file(&e.path(), limit)?;
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
    let (parent, name) = parent_and_name(dir);
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let _lock = WriterLock::take(&parent, &name)?;
    recover_interrupted(dir)?;
    clean_leftovers(&parent, &name);
    check_replaceable(dir)?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.tmp-"))
        .tempdir_in(&parent)
        .map_err(|e| Error::io(&parent, e))?;
    crash_point("temporary-created");
    for (rel, bytes) in &carried_files(dir, carry_previous)? {
        let path = tmp.path().join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        write_synced(&path, bytes)?;
    }
    crash_point("carried-written");
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
    crash_point("files-written");
    let json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| Error::package(dir, format!("cannot serialise the manifest: {e}")))?;
    write_synced(&tmp.path().join(MANIFEST_FILE), &json)?;
    for sub in [DRIVERS_DIR, PREVIOUS_DIR] {
        let d = tmp.path().join(sub);
        if d.is_dir() {
            sync_dir(&d)?;
        }
    }
    sync_dir(tmp.path())?;
    crash_point("manifest-written");
    swap_in(tmp.keep(), dir, &parent)
}

/// `dir`'s parent directory (`.` for a bare name) and its file name.
fn parent_and_name(dir: &Path) -> (PathBuf, String) {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "package".into());
    (parent, name)
}

/// An exclusive lock on `parent/.NAME.lock`, held while a package is written: one writer at a
/// time, so any `.NAME.tmp-*` / `.NAME.old-*` sibling seen while holding it is an earlier
/// writer's left-over. Released when dropped (or when the process dies).
struct WriterLock(#[allow(dead_code)] std::fs::File);

impl WriterLock {
    fn take(parent: &Path, name: &str) -> Result<Self> {
        let path = parent.join(format!(".{name}.lock"));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        f.lock().map_err(|e| Error::io(&path, e))?;
        Ok(Self(f))
    }
}

/// Remove the temporary and set-aside copies an interrupted write left next to the package
/// (called with the writer lock held, after [`recover_interrupted`]). Failures only warn: they
/// cost disk space, not correctness.
fn clean_leftovers(parent: &Path, name: &str) {
    for p in leftovers(parent, name) {
        log::info!("removing {} left by an interrupted write", p.display());
        if let Err(e) = std::fs::remove_dir_all(&p) {
            log::warn!("cannot remove {}: {e}", p.display());
        }
    }
}

/// `.NAME.tmp-*` and `.NAME.old-*` directories in `parent`, oldest name first.
fn leftovers(parent: &Path, name: &str) -> Vec<PathBuf> {
    let (tmp, old) = (format!(".{name}.tmp-"), format!(".{name}.old-"));
    let mut out: Vec<PathBuf> = std::fs::read_dir(parent)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            (n.starts_with(&tmp) || n.starts_with(&old))
                && e.file_type().map(|t| t.is_dir()).unwrap_or(false)
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

/// If `dir` is missing because a writer on a file system without an atomic exchange was cut off
/// between its two renames, put the package back: the complete new version when its temporary
/// directory verifies, else the old one set aside. Returns whether anything was restored.
/// Called by every writer (under the lock) and by [`super::Package::open`] when `dir` is missing.
pub(crate) fn recover_interrupted(dir: &Path) -> Result<bool> {
    if std::fs::symlink_metadata(dir).is_ok() {
        return Ok(false);
    }
    let (parent, name) = parent_and_name(dir);
    let candidates = leftovers(&parent, &name);
    let (new, old): (Vec<_>, Vec<_>) = candidates.into_iter().partition(|p| {
        p.file_name()
            .map(|n| n.to_string_lossy().starts_with(&format!(".{name}.tmp-")))
            .unwrap_or(false)
    });
    let pick = new
        .iter()
        .chain(old.iter())
        .find(|p| Package::open_at(p).is_ok());
    let Some(pick) = pick else { return Ok(false) };
    log::warn!(
        "{} was missing after an interrupted write; restoring it from {}",
        dir.display(),
        pick.display()
    );
    std::fs::rename(pick, dir).map_err(|e| Error::io(dir, e))?;
    sync_dir(&parent)?;
    Ok(true)
}

/// Fault injection for the crash tests: with `PE_CLIP_CRASH_AT=<step>` in the environment the
/// process kills itself with SIGKILL at that step of a package write (no destructors, no
/// buffered data: what a power cut leaves, short of the page cache).
fn crash_point(step: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| std::env::var("PE_CLIP_CRASH_AT").ok());
    if at.as_deref() == Some(step) {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        #[allow(unsafe_code)]
        // SAFETY: sending a signal to our own process; SIGKILL does not return.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        std::process::abort();
    }
}

/// The steps of a package write at which [`crash_point`] can stop it, in order.
pub const CRASH_STEPS: &[&str] = &[
    "temporary-created",
    "carried-written",
    "files-written",
    "manifest-written",
    "exchanged",
    "set-aside",
    "renamed",
];

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
    extra.extend(files_under(dir, DRIVERS_DIR, super::MAX_MANIFEST_BYTES)?);
    if carry_previous {
        extra.extend(files_under(dir, PREVIOUS_DIR, super::MAX_MODEL_BYTES)?);
        return Ok(extra);
    }
    match Package::open(dir) {
        Ok(current) => {
            let mpath = dir.join(MANIFEST_FILE);
            extra.push((
                format!("{PREVIOUS_DIR}/{MANIFEST_FILE}"),
                super::read_package_file(&mpath, super::MAX_MANIFEST_BYTES)?,
            ));
            for c in &current.manifest.checksums {
                let p = dir.join(&c.file);
                extra.push((
                    format!("{PREVIOUS_DIR}/{}", c.file),
                    super::read_package_file(&p, c.bytes)?,
                ));
            }
        }
        Err(e) => log::warn!("the package being replaced is not kept: {e}"),
    }
    Ok(extra)
}

/// Put the complete, synced directory `tmp` in place of `dir`.
///
/// Where `dir` exists, one `renameat2(RENAME_EXCHANGE)` swaps the two directories atomically:
/// at every instant `dir` is the old complete package or the new one, and after the parent
/// directory's fsync the new one survives a power cut. The old version (now at `tmp`) is then
/// removed. On a file system without the exchange (EINVAL: some network and FUSE file
/// systems), `dir` is renamed aside and `tmp` renamed into place; a crash between the two
/// leaves `dir` missing, and [`recover_interrupted`] (run by `Package::open` and every writer)
/// puts the newest complete copy back.
fn swap_in(tmp: PathBuf, dir: &Path, parent: &Path) -> Result<()> {
    let cleanup = |e: Error| {
        let _ = std::fs::remove_dir_all(&tmp);
        e
    };
    if std::fs::symlink_metadata(dir).is_err() {
        std::fs::rename(&tmp, dir).map_err(|e| cleanup(Error::io(dir, e)))?;
        crash_point("renamed");
        return sync_dir(parent);
    }
    match exchange(&tmp, dir) {
        Ok(()) => {
            sync_dir(parent)?;
            crash_point("exchanged");
            // `tmp` now holds the replaced version.
            if let Err(e) = std::fs::remove_dir_all(&tmp) {
                log::warn!("cannot remove the replaced version {}: {e}", tmp.display());
            }
            Ok(())
        }
        Err(e) if exchange_unsupported(&e) => {
            let (_, name) = parent_and_name(dir);
            let old = parent.join(format!(".{name}.old-{}", std::process::id()));
            std::fs::rename(dir, &old).map_err(|e| cleanup(Error::io(dir, e)))?;
            crash_point("set-aside");
            if let Err(e) = std::fs::rename(&tmp, dir) {
                let _ = std::fs::rename(&old, dir);
                return Err(cleanup(Error::io(dir, e)));
            }
            crash_point("renamed");
            sync_dir(parent)?;
            let _ = std::fs::remove_dir_all(old);
            Ok(())
        }
        Err(e) => Err(cleanup(Error::io(dir, e))),
    }
}

/// Swap `a` and `b` atomically (Linux `renameat2(RENAME_EXCHANGE)`). With
/// `PE_CLIP_RENAME_EXCHANGE=off` it reports "unsupported", so tests reach the fallback.
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    if std::env::var("PE_CLIP_RENAME_EXCHANGE").as_deref() == Ok("off") {
        return Err(std::io::Error::from_raw_os_error(EINVAL));
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let ca = CString::new(a.as_os_str().as_bytes())?;
        let cb = CString::new(b.as_os_str().as_bytes())?;
        // SAFETY: both paths are NUL-terminated and outlive the call.
        #[allow(unsafe_code)]
        let r = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                ca.as_ptr(),
                libc::AT_FDCWD,
                cb.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = (a, b);
        Err(std::io::Error::from_raw_os_error(EINVAL))
    }
}

const EINVAL: i32 = 22;
const ENOSYS: i32 = 38;

fn exchange_unsupported(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(EINVAL) | Some(ENOSYS))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

/// fsync a directory, so that the entries created or renamed in it survive a power cut.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
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
        files.push((c.file.clone(), super::read_package_file(&p, c.bytes)?));
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

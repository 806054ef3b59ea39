//! Atomic file writes (a crash never leaves a half-written artifact) and bounded reads (a file
//! that is not a regular file, or larger than what it may hold, is refused before it is read).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The temporary path used while `path` is being written (same directory, so the final rename is
/// atomic on one file system).
pub fn temp_path_for(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Write `bytes` to `path` through a temporary file, fsync, then rename over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// Create `path` through a temporary file filled by `fill`, fsync, then rename over `path`.
/// On any error the temporary file is removed and `path` is untouched.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = temp_path_for(path);
    let result = (|| {
        let file = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::new(file);
        fill(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Save tensors as safetensors through a temporary file and a rename, with a plain file mode.
#[cfg(feature = "train")]
pub fn save_safetensors_atomic(
    tensors: &std::collections::HashMap<String, candle_core::Tensor>,
    path: &Path,
) -> Result<()> {
    let tmp = temp_path_for(path);
    candle_core::safetensors::save(tensors, &tmp).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::invalid(path, format!("writing tensors failed: {e}"))
    })?;
    // The safetensors writer creates its file owner-only; give it a plain file's mode.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// The most a small text file pe-clip reads whole (manifest, `config.json`, class list, driver
/// profile, split files) may hold: far above any real one, far below a memory problem.
pub const MAX_SMALL_FILE_BYTES: u64 = 8 << 20;

/// Open `path` for reading, refusing anything but a regular file (a FIFO would block, a device
/// such as `/dev/zero` never ends). With `no_follow` a symbolic link is refused too (files inside
/// a package). Returns the file and its length.
pub fn open_regular(path: &Path, no_follow: bool) -> Result<(std::fs::File, u64)> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW where asked.
        #[cfg(target_os = "linux")]
        let (nonblock, nofollow) = (0o4000, 0o400000);
        #[cfg(not(target_os = "linux"))]
        let (nonblock, nofollow) = (0x4, 0x100);
        opts.custom_flags(nonblock | if no_follow { nofollow } else { 0 });
    }
    let f = opts.open(path).map_err(|e| {
        if no_follow && std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
            Error::invalid(
                path,
                "is a symbolic link; package files must be regular files",
            )
        } else {
            Error::io(path, e)
        }
    })?;
    let meta = f.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::invalid(
            path,
            "is not a regular file (a device, FIFO, socket or directory)",
        ));
    }
    Ok((f, meta.len()))
}

/// Read a regular file whole, refusing one over `limit` bytes (it is also refused if it grows
/// past the limit while being read).
pub fn read_bounded(path: &Path, limit: u64, no_follow: bool) -> Result<Vec<u8>> {
    use std::io::Read;
    let (f, len) = open_regular(path, no_follow)?;
    if len > limit {
        return Err(too_large(path, len, limit));
    }
    let mut out = Vec::with_capacity(len as usize);
    f.take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| Error::io(path, e))?;
    if out.len() as u64 > limit {
        return Err(too_large(path, out.len() as u64, limit));
    }
    Ok(out)
}

/// [`read_bounded`] of a small text file ([`MAX_SMALL_FILE_BYTES`]), as UTF-8.
pub fn read_small_text(path: &Path) -> Result<String> {
    let bytes = read_bounded(path, MAX_SMALL_FILE_BYTES, false)?;
    String::from_utf8(bytes).map_err(|_| Error::invalid(path, "is not UTF-8 text"))
}

fn too_large(path: &Path, len: u64, limit: u64) -> Error {
    Error::invalid(
        path,
        format!("is {len} bytes or more; at most {limit} are accepted for this file"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_reads_refuse_devices_fifos_links_and_large_files() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("a.json");
        std::fs::write(&small, b"{}").unwrap();
        assert_eq!(read_bounded(&small, 2, false).unwrap(), b"{}");
        let e = read_bounded(&small, 1, false).unwrap_err().to_string();
        assert!(e.contains("a.json") && e.contains("at most 1"), "{e}");
        #[cfg(unix)]
        {
            let e = read_bounded(Path::new("/dev/zero"), 10, false).unwrap_err();
            assert!(e.to_string().contains("not a regular file"), "{e}");
            let link = dir.path().join("link");
            std::os::unix::fs::symlink(&small, &link).unwrap();
            assert!(read_bounded(&link, 10, false).is_ok());
            let e = read_bounded(&link, 10, true).unwrap_err().to_string();
            assert!(e.contains("symbolic link"), "{e}");
            let fifo = dir.path().join("fifo");
            let made = std::process::Command::new("mkfifo").arg(&fifo).status();
            assert!(made.unwrap().success(), "mkfifo (coreutils) failed");
            let e = read_bounded(&fifo, 10, false).unwrap_err().to_string();
            assert!(e.contains("not a regular file"), "{e}");
        }
    }

    #[test]
    fn failed_write_leaves_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bin");
        write_atomic(&p, b"old").unwrap();
        let err = write_atomic_with(&p, |w| {
            w.write_all(b"partial")?;
            Err(std::io::Error::other("boom"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("a.bin"));
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}

//! Model packages on disk: a directory with `model.onnx` (the per-frame step model) and a
//! versioned `manifest.json` (the contract, [`pe_clip_models::package`]) that says how to feed it
//! and read it, with the checksum of every other file.
//!
//! - here: opening a package (manifest parsed and validated, every file's size and SHA-256
//!   verified before anything runs) and what the layers above read from it;
//! - [`store`]: writing packages atomically, the `previous/` version and `drivers/` profiles
//!   carried across rewrites, rollback;
//! - [`demo`]: the demo package embedded in the binary.
//!
//! Loading the step model from a package is the engine's (`crate::engine`).

pub mod demo;
pub mod store;

use std::path::{Path, PathBuf};

use pe_clip_calibrate::profile::ModelBinding;
use pe_clip_models::{PixelNorm, PreprocessSpec};
use sha2::{Digest, Sha256};

pub use pe_clip_models::package::*;
pub use store::{rollback, write_package, write_package_carrying_previous, RollbackReport};

use crate::error::{Error, Result};

/// Hex SHA-256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    sha256_reader(path, &mut f)
}

fn sha256_reader(path: &Path, r: &mut impl std::io::Read) -> Result<String> {
    let mut h = Sha256::new();
    std::io::copy(r, &mut h).map_err(|e| Error::io(path, e))?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The most `manifest.json` may hold (a real one is a few kB; the embedded demo's under 10 kB).
pub const MAX_MANIFEST_BYTES: u64 = pe_clip_models::io::MAX_SMALL_FILE_BYTES;

/// The most a package's model file may hold (ONNX's protobuf encoding caps a model at 2 GiB).
pub const MAX_MODEL_BYTES: u64 = 2 << 30;

/// Read a file inside a package: a regular file, not a symbolic link, at most `limit` bytes.
pub(crate) fn read_package_file(path: &Path, limit: u64) -> Result<Vec<u8>> {
    pe_clip_models::io::read_bounded(path, limit, true).map_err(|e| Error::package(path, untag(e)))
}

/// A models-crate error's reason without its leading path (the caller names the path).
fn untag(e: pe_clip_models::Error) -> String {
    match e {
        pe_clip_models::Error::Invalid { reason, .. } => reason,
        pe_clip_models::Error::Io { err, .. } => err.to_string(),
        other => other.to_string(),
    }
}

/// A verified package on disk (or embedded in the binary).
#[derive(Debug, Clone)]
pub struct Package {
    pub dir: PathBuf,
    pub manifest: Manifest,
    embedded: Option<demo::Embedded>,
}

/// Parse and validate the manifest read from `mpath`.
pub(crate) fn parse_manifest(mpath: &Path, text: &[u8]) -> Result<Manifest> {
    Manifest::parse(text).map_err(|source| Error::Manifest {
        path: mpath.to_path_buf(),
        source,
    })
}

/// Refuse a file whose size or SHA-256 is not what the manifest says (`sum` is only computed
/// when the size matches).
pub(crate) fn check_sum(
    path: &Path,
    c: &FileSum,
    len: u64,
    sum: impl FnOnce() -> Result<String>,
) -> Result<()> {
    if len != c.bytes {
        return Err(Error::package(
            path,
            format!(
                "is {len} bytes, the manifest says {} (damaged or replaced)",
                c.bytes
            ),
        ));
    }
    let sum = sum()?;
    if sum != c.sha256 {
        return Err(Error::package(
            path,
            format!(
                "checksum mismatch (sha256 {sum}, the manifest says {}): the file is \
                 damaged or does not belong to this manifest",
                c.sha256
            ),
        ));
    }
    Ok(())
}

impl Package {
    /// Read `dir/manifest.json`, check its format and version, validate it, and verify every
    /// file's size and SHA-256.
    ///
    /// Files are opened without following symbolic links and must be regular files of the size
    /// the manifest records before they are hashed (a FIFO or `/dev/zero` is refused at once).
    /// If `dir` is missing because a write was cut off, the complete copy it left is put back
    /// first (see [`store`]).
    pub fn open(dir: &Path) -> Result<Self> {
        if std::fs::symlink_metadata(dir).is_err() {
            store::recover_interrupted(dir)?;
        }
        Self::open_at(dir)
    }

    /// [`Package::open`] without the recovery of an interrupted write.
    pub(crate) fn open_at(dir: &Path) -> Result<Self> {
        let mpath = dir.join(MANIFEST_FILE);
        if !dir.is_dir() {
            return Err(Error::package(dir, "package directory not found"));
        }
        let text = read_package_file(&mpath, MAX_MANIFEST_BYTES)?;
        let manifest = parse_manifest(&mpath, &text)?;
        for c in &manifest.checksums {
            let path = dir.join(&c.file);
            let (mut f, len) = pe_clip_models::io::open_regular(&path, true)
                .map_err(|e| Error::package(&path, untag(e)))?;
            check_sum(&path, c, len, || sha256_reader(&path, &mut f))?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            embedded: None,
        })
    }

    /// Path of the step model.
    pub fn model_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.model)
    }

    /// The step model's bytes.
    pub fn model_bytes(&self) -> Result<std::borrow::Cow<'static, [u8]>> {
        match &self.embedded {
            Some(e) => Ok(std::borrow::Cow::Borrowed(e.bytes())),
            None => {
                let path = self.model_path();
                let limit = self.manifest.model_checksum().map_or(0, |c| c.bytes);
                Ok(std::borrow::Cow::Owned(read_package_file(&path, limit)?))
            }
        }
    }

    /// The model file's SHA-256 as the manifest records it (verified when the package was
    /// opened).
    pub fn model_sha256(&self) -> &str {
        self.manifest
            .model_checksum()
            .map(|c| c.sha256.as_str())
            .expect("Manifest::validate requires the model's checksum")
    }

    /// Whether the package is the one built into the binary (it cannot be changed).
    pub fn is_embedded(&self) -> bool {
        self.embedded.is_some()
    }

    /// Class names in logit order.
    pub fn class_names(&self) -> Vec<String> {
        self.manifest.class_names()
    }

    /// The index of the neutral class, or an error saying that driver profiles need one.
    pub fn neutral_class(&self) -> Result<usize> {
        self.manifest.neutral_class().ok_or_else(|| {
            Error::package(
                &self.dir,
                format!("has no class named {NEUTRAL:?}: driver profiles need one"),
            )
        })
    }

    /// How frames are prepared for the step model: resized to its size as RGB bytes (the
    /// normalisation happens inside the model).
    pub fn preprocess_spec(&self) -> PreprocessSpec {
        PreprocessSpec {
            image_size: self.manifest.preprocess.image_size,
            pixel_norm: PixelNorm::None,
        }
    }

    /// Which model the package's features belong to (what a driver profile is bound to).
    pub fn model_binding(&self) -> ModelBinding {
        ModelBinding {
            checkpoint_sha256: self.manifest.provenance.checkpoint_sha256.clone(),
            feature_dim: self.manifest.head.feature_dim,
            classes: self.class_names(),
        }
    }
}

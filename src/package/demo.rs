//! The shipped demo package (`models/demo/`), embedded in the binary so that `pe-clip demo` runs
//! anywhere the binary is copied, and verified like a package on disk.

use std::path::PathBuf;

use super::{check_sum, parse_manifest, sha256_hex, Package, MANIFEST_FILE};
use crate::error::{Error, Result};

/// The demo package's manifest bytes.
pub const DEMO_MANIFEST: &[u8] = include_bytes!("../../models/demo/manifest.json");
const DEMO_MODEL: &[u8] = include_bytes!("../../models/demo/model.onnx");
/// What the embedded demo package calls itself in messages.
pub const DEMO_PACKAGE_NAME: &str = "<built-in demo package (models/demo)>";

/// Model bytes held in memory.
#[derive(Clone)]
pub(crate) struct Embedded(&'static [u8]);

impl Embedded {
    pub(crate) fn bytes(&self) -> &'static [u8] {
        self.0
    }
}

impl std::fmt::Debug for Embedded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} embedded bytes", self.0.len())
    }
}

impl Package {
    /// The package in `dir`, or the built-in demo package where `dir` is `demo`.
    pub fn open_or_demo(dir: &std::path::Path) -> Result<Self> {
        if dir == std::path::Path::new("demo") {
            Self::embedded_demo()
        } else {
            Self::open(dir)
        }
    }

    /// The demo package built into the binary, verified like one on disk.
    pub fn embedded_demo() -> Result<Self> {
        let dir = PathBuf::from(DEMO_PACKAGE_NAME);
        let manifest = parse_manifest(&dir.join(MANIFEST_FILE), DEMO_MANIFEST)?;
        let c = manifest
            .model_checksum()
            .ok_or_else(|| Error::package(&dir, "no model checksum"))?;
        check_sum(
            &dir.join(&manifest.model),
            c,
            DEMO_MODEL.len() as u64,
            || Ok(sha256_hex(DEMO_MODEL)),
        )?;
        Ok(Self {
            dir,
            manifest,
            embedded: Some(Embedded(DEMO_MODEL)),
        })
    }
}

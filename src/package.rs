//! Model packages: a directory with `model.onnx` (the per-frame step model) and a versioned
//! `manifest.json` that says how to feed it and read it: classes and their texts, the baked text
//! features of the video head, preprocessing, temporal sampling, the recurrent-state layout,
//! quantization, provenance and the checksum of every other file.
//!
//! Packages are written atomically (a temporary sibling directory renamed into place) and loading
//! verifies the format version and the checksums before anything runs.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::engine::StepModel;
use crate::error::{Error, Result};

/// `format` of every manifest.
pub const PACKAGE_FORMAT: &str = "pe-clip-package";
/// The manifest version this build writes and the newest it reads.
pub const PACKAGE_VERSION: u32 = 1;
/// The manifest's file name.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The step model's file name.
pub const MODEL_FILE: &str = "model.onnx";

/// One class: its name and the text its feature was computed from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassEntry {
    pub name: String,
    pub text: String,
}

/// The video head: `logits = logit_scale · normalise(mean_t feature_t) · text_featuresᵀ`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Head {
    pub feature_dim: usize,
    pub logit_scale: f32,
    /// L2-normalised class features, one row per class.
    pub text_features: Vec<Vec<f32>>,
}

impl Head {
    /// Class logits of the mean of per-frame `features` (each `feature_dim` long).
    pub fn logits_of_features<'a>(
        &self,
        features: impl IntoIterator<Item = &'a [f32]>,
    ) -> Vec<f32> {
        let mut sum = vec![0f64; self.feature_dim];
        for f in features {
            for (s, v) in sum.iter_mut().zip(f) {
                *s += *v as f64;
            }
        }
        self.logits_of_sum(&sum)
    }

    /// Class logits of a running feature sum (the mean's direction is the sum's).
    pub fn logits_of_sum(&self, sum: &[f64]) -> Vec<f32> {
        pe_clip_calibrate::profile::head_logits(&self.text_features, self.logit_scale, sum)
    }
}

/// How frames are prepared before `frame`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// Square model input in pixels.
    pub image_size: usize,
    /// `rgb`: three bytes per pixel in R, G, B order.
    pub color: String,
    /// `nhwc-u8`: `[1, S, S, 3]` bytes; scaling and normalisation are inside the model.
    pub layout: String,
    /// The normalisation the model applies inside (`none`: x/255, `clip`: CLIP's mean and std).
    pub pixel_norm: String,
    /// How a frame is resized to the model input.
    pub resize: String,
    /// How the face region is chosen before resizing.
    pub face_crop: String,
}

/// Which frames the model sees.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Temporal {
    /// Sampled frames per prediction (the model was trained on 16-step sequences).
    pub window: usize,
    /// Camera frames between two sampled frames (match the training clips' spacing).
    pub stride: usize,
}

/// One recurrent state pair of the step model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateEntry {
    pub block: usize,
    pub input: String,
    pub output: String,
    pub rows: usize,
    pub width: usize,
    /// `gru`, `lstm` (h and c side by side) or `rnn`.
    pub cell: String,
}

/// What the integer export did and how well it kept the f32 model's answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quantization {
    /// What was quantized and how, in words.
    pub scheme: String,
    pub observer: String,
    /// SmoothQuant migration strength folded into the LayerNorms (absent: none).
    pub smooth_alpha: Option<f32>,
    /// One weight scale per output column instead of one per tensor.
    pub per_channel: bool,
    /// Linear layers in int8 (of all linear layers).
    pub quantized_layers: usize,
    pub linear_layers: usize,
    pub calibration: CalibrationSummary,
    /// int8 vs f32 on held-out clips, when measured.
    pub fidelity: Option<Fidelity>,
    /// The last on-device re-calibration of the activation ranges (`pe-clip calibrate`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recalibration: Option<Recalibration>,
}

/// What `pe-clip calibrate` changed: new activation ranges from local clips (the weights, their
/// scales and the SmoothQuant factors folded at export stay).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recalibration {
    /// Where the clips came from.
    pub source: String,
    pub observer: String,
    /// The models the inputs were observed through, in order (`int8`: the package's own;
    /// `f32`: its int8 weights with f32 activations); the last one's ranges were used.
    #[serde(default)]
    pub passes: Vec<String>,
    pub clips: usize,
    pub frames: usize,
    pub clip_list_sha256: String,
    /// int8 layers whose input range was re-estimated.
    pub layers: usize,
    /// Median and extreme ratios new / old input threshold over those layers.
    pub threshold_ratio_median: f64,
    pub threshold_ratio_min: f64,
    pub threshold_ratio_max: f64,
    /// SHA-256 of the model file it replaced (kept under `previous/`).
    pub previous_model_sha256: String,
    /// Old and new ranges compared on held-out clips (`--check`), when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<RecalibrationCheck>,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
}

/// The calibration set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationSummary {
    pub source: String,
    pub clips: usize,
    pub frames: usize,
    /// SHA-256 over the sorted clip paths (which clips, not their bytes).
    pub clip_list_sha256: String,
}

/// int8 vs f32 agreement on held-out clips.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fidelity {
    pub source: String,
    pub clips: usize,
    /// Fraction of clips whose top-1 class is the same.
    pub top1_agreement: f64,
    pub logit_cosine_mean: f64,
    pub logit_cosine_min: f64,
    /// With labels: UAR of the f32 and of the int8 model (fractions).
    pub uar_f32: Option<f64>,
    pub uar_int8: Option<f64>,
}

/// Where the package came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// The run directory exported.
    pub checkpoint: String,
    /// SHA-256 of the run's trainable weights file.
    pub checkpoint_sha256: String,
    /// The run's resolved configuration (`peclip.json`).
    pub config: serde_json::Value,
    /// The pe-clip source revision that wrote the package.
    pub source_revision: String,
    pub pe_clip_version: String,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
}

/// Checksum of one file of the package.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileSum {
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// `f32` or `int8`.
    pub precision: String,
    pub model: String,
    pub opset: i64,
    pub classes: Vec<ClassEntry>,
    pub head: Head,
    pub preprocess: Preprocess,
    pub temporal: Temporal,
    pub state: Vec<StateEntry>,
    pub quantization: Option<Quantization>,
    pub provenance: Provenance,
    /// The population's resting face in feature space, for driver profiles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neutral_reference: Option<NeutralReference>,
    pub checksums: Vec<FileSum>,
}

/// int8 against a reference on clips: top-1 agreement and logit cosine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Agreement {
    pub clips: usize,
    pub top1_agreement: f64,
    pub logit_cosine_mean: f64,
    pub logit_cosine_min: f64,
}

/// The package before and after a re-calibration, each against the same reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecalibrationCheck {
    pub source: String,
    /// What the int8 models were compared with.
    pub reference: String,
    pub before: Agreement,
    pub after: Agreement,
}

/// The mean per-frame feature of neutral clips of many people (zero state, the package's
/// window), the point a driver's own resting face is measured from (see `pe_clip::calibration`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NeutralReference {
    pub feature: Vec<f32>,
    pub source: String,
    pub clips: usize,
    pub frames: usize,
}

/// Hex SHA-256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| Error::io(path, e))?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Sub-directory of a package holding driver profiles (`pe-clip calibrate --driver`); carried
/// over whenever the package is rewritten.
pub const DRIVERS_DIR: &str = "drivers";
/// Sub-directory of a package holding the version before the last `pe-clip calibrate`.
pub const PREVIOUS_DIR: &str = "previous";

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
    if dir.exists() {
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
    }
    let mut extra: Vec<(String, Vec<u8>)> = Vec::new();
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
    if dir.join(MANIFEST_FILE).is_file() {
        extra.extend(files_under(dir, DRIVERS_DIR)?);
        if carry_previous {
            extra.extend(files_under(dir, PREVIOUS_DIR)?);
        } else {
            // The current package, if it verifies, becomes `previous/`.
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
        }
    }
    for (rel, bytes) in &extra {
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
    // Move an existing package aside, put the new one in place, then drop the old one: at every
    // moment `dir` is either the old package or the new one.
    let old = if dir.exists() {
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
        Some(old)
    } else {
        None
    };
    let tmp_path = tmp.keep();
    if let Err(e) = std::fs::rename(&tmp_path, dir) {
        if let Some(old) = &old {
            let _ = std::fs::rename(old, dir);
        }
        let _ = std::fs::remove_dir_all(&tmp_path);
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

/// The shipped demo package (`models/demo/`), embedded in the binary so that `pe-clip demo` runs
/// anywhere the binary is copied.
pub const DEMO_MANIFEST: &[u8] = include_bytes!("../models/demo/manifest.json");
const DEMO_MODEL: &[u8] = include_bytes!("../models/demo/model.onnx");
/// What the embedded demo package calls itself in messages.
pub const DEMO_PACKAGE_NAME: &str = "<built-in demo package (models/demo)>";

/// Model bytes held in memory (the embedded demo package).
#[derive(Clone)]
struct Embedded(&'static [u8]);

impl std::fmt::Debug for Embedded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} embedded bytes", self.0.len())
    }
}

/// A verified package on disk (or embedded in the binary).
#[derive(Debug, Clone)]
pub struct Package {
    pub dir: PathBuf,
    pub manifest: Manifest,
    embedded: Option<Embedded>,
}

/// Parse and check a manifest's format, version and head.
fn parse_manifest(mpath: &Path, text: &[u8]) -> Result<Manifest> {
    let value: serde_json::Value = serde_json::from_slice(text)
        .map_err(|e| Error::package(mpath, format!("not valid JSON: {e}")))?;
    match value.get("format").and_then(|v| v.as_str()) {
        Some(PACKAGE_FORMAT) => {}
        other => {
            return Err(Error::package(
                mpath,
                format!("not a pe-clip package manifest (format {other:?})"),
            ))
        }
    }
    let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
    if version != PACKAGE_VERSION as u64 {
        return Err(Error::package(
            mpath,
            format!(
                "package version {version}, this pe-clip reads version {PACKAGE_VERSION}: \
                 re-export the model with this pe-clip or use a matching pe-clip"
            ),
        ));
    }
    let manifest: Manifest = serde_json::from_value(value)
        .map_err(|e| Error::package(mpath, format!("invalid manifest: {e}")))?;
    if !manifest.checksums.iter().any(|c| c.file == manifest.model) {
        return Err(Error::package(
            mpath,
            format!("no checksum for {}", manifest.model),
        ));
    }
    let m = &manifest;
    if m.head.text_features.len() != m.classes.len()
        || m.head
            .text_features
            .iter()
            .any(|r| r.len() != m.head.feature_dim)
    {
        return Err(Error::package(
            mpath,
            "head.text_features must have one row of feature_dim values per class",
        ));
    }
    Ok(manifest)
}

fn check_sum(
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
    /// Read `dir/manifest.json`, check its format and version, and verify every file's size and
    /// SHA-256.
    pub fn open(dir: &Path) -> Result<Self> {
        let mpath = dir.join(MANIFEST_FILE);
        if !dir.is_dir() {
            return Err(Error::package(dir, "package directory not found"));
        }
        let text = std::fs::read(&mpath).map_err(|e| Error::io(&mpath, e))?;
        let manifest = parse_manifest(&mpath, &text)?;
        for c in &manifest.checksums {
            let path = dir.join(&c.file);
            if c.file.contains('/') || c.file.contains("..") {
                return Err(Error::package(
                    &mpath,
                    format!("bad file name {:?}", c.file),
                ));
            }
            let meta = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
            check_sum(&path, c, meta.len(), || sha256_file(&path))?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            embedded: None,
        })
    }

    /// The demo package built into the binary, verified like one on disk.
    pub fn embedded_demo() -> Result<Self> {
        let dir = PathBuf::from(DEMO_PACKAGE_NAME);
        let manifest = parse_manifest(&dir.join(MANIFEST_FILE), DEMO_MANIFEST)?;
        let model = &manifest.model;
        let c = manifest
            .checksums
            .iter()
            .find(|c| &c.file == model)
            .ok_or_else(|| Error::package(&dir, "no model checksum"))?;
        check_sum(&dir.join(model), c, DEMO_MODEL.len() as u64, || {
            Ok(sha256_hex(DEMO_MODEL))
        })?;
        Ok(Self {
            dir,
            manifest,
            embedded: Some(Embedded(DEMO_MODEL)),
        })
    }

    /// Path of the step model.
    pub fn model_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.model)
    }

    /// The step model's bytes.
    pub fn model_bytes(&self) -> Result<std::borrow::Cow<'static, [u8]>> {
        match &self.embedded {
            Some(Embedded(bytes)) => Ok(std::borrow::Cow::Borrowed(bytes)),
            None => {
                let path = self.model_path();
                Ok(std::borrow::Cow::Owned(
                    std::fs::read(&path).map_err(|e| Error::io(&path, e))?,
                ))
            }
        }
    }

    /// The model file's SHA-256 as the manifest records it (verified when the package was
    /// opened).
    pub fn model_sha256(&self) -> &str {
        self.manifest
            .checksums
            .iter()
            .find(|c| c.file == self.manifest.model)
            .map(|c| c.sha256.as_str())
            .expect("parse_manifest requires the model's checksum")
    }

    /// Whether the package is the one built into the binary (it cannot be changed).
    pub fn is_embedded(&self) -> bool {
        self.embedded.is_some()
    }

    /// Load the step model and check it against the manifest (input size, feature width, states).
    pub fn step_model(&self) -> Result<StepModel> {
        let path = self.model_path();
        let model = match &self.embedded {
            Some(Embedded(bytes)) => StepModel::from_onnx(bytes, &path.display().to_string())?,
            None => StepModel::from_file(&path)?,
        };
        self.checked(model)
    }

    /// Load a variant of the step model (`bytes`: e.g. with calibration taps) and check it
    /// against the manifest like [`Package::step_model`].
    pub fn step_model_from(&self, bytes: &[u8], context: &str) -> Result<StepModel> {
        self.checked(StepModel::from_onnx(bytes, context)?)
    }

    fn checked(&self, model: StepModel) -> Result<StepModel> {
        let path = self.model_path();
        let m = &self.manifest;
        let mismatch = |what: String| {
            Err(Error::package(
                &path,
                format!("does not match the manifest: {what}"),
            ))
        };
        if model.image_size() != m.preprocess.image_size {
            return mismatch(format!(
                "input {} px, manifest {} px",
                model.image_size(),
                m.preprocess.image_size
            ));
        }
        if model.feature_dim() != m.head.feature_dim {
            return mismatch(format!(
                "feature width {}, manifest {}",
                model.feature_dim(),
                m.head.feature_dim
            ));
        }
        let slots: Vec<(&str, usize, usize)> = model
            .slots()
            .iter()
            .map(|s| (s.input.as_str(), s.rows, s.width))
            .collect();
        let want: Vec<(&str, usize, usize)> = m
            .state
            .iter()
            .map(|s| (s.input.as_str(), s.rows, s.width))
            .collect();
        if slots != want {
            return mismatch(format!("states {slots:?}, manifest {want:?}"));
        }
        Ok(model)
    }

    /// Class names in logit order.
    pub fn class_names(&self) -> Vec<String> {
        self.manifest
            .classes
            .iter()
            .map(|c| c.name.clone())
            .collect()
    }
}

//! `manifest.json` of a model package: what the step model is, how to feed it and how to read
//! its output. Parsed strictly (`deny_unknown_fields`, typed enums for every closed set of
//! values) and checked by [`Manifest::validate`] before anything else reads it.

use serde::{Deserialize, Serialize};

use super::io::{state_input, state_output};
use crate::preprocess::PixelNorm;

/// `format` of every manifest.
pub const PACKAGE_FORMAT: &str = "pe-clip-package";
/// The manifest version this build writes and the newest it reads.
pub const PACKAGE_VERSION: u32 = 1;
/// The manifest's file name.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The step model's file name.
pub const MODEL_FILE: &str = "model.onnx";
/// Sub-directory of a package holding driver profiles (`pe-clip calibrate --driver`); carried
/// over whenever the package is rewritten.
pub const DRIVERS_DIR: &str = "drivers";
/// Sub-directory of a package holding the version before the last rewrite.
pub const PREVIOUS_DIR: &str = "previous";

/// The largest values a manifest may ask for: far above any real model (ViT-B/16: 224 px, 512
/// features, window 16), low enough that nothing sized from them exhausts a device's memory.
pub mod limits {
    pub const IMAGE_SIZE: usize = 2048;
    pub const FEATURE_DIM: usize = 16_384;
    pub const CLASSES: usize = 1024;
    pub const WINDOW: usize = 4096;
    pub const STRIDE: usize = 1000;
    /// Recurrent-state floats over all blocks.
    pub const STATE_FLOATS: usize = 64 << 20;
}

/// What a manifest gets wrong. Messages name the key.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("not valid JSON: {0}")]
    Json(serde_json::Error),
    #[error("not a pe-clip package manifest (format {0:?})")]
    Format(Option<String>),
    #[error(
        "package version {found}, this pe-clip reads version {PACKAGE_VERSION}: re-export the \
         model with this pe-clip or use a matching pe-clip"
    )]
    Version { found: u64 },
    #[error("invalid manifest: {0}")]
    Schema(serde_json::Error),
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ManifestError {
    ManifestError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// The step model's arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    /// int8 linear layers (`quantization` says how).
    Int8,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Int8 => "int8",
        })
    }
}

/// The recurrent cell of a block's temporal adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CellKind {
    Gru,
    /// `h` and `c` side by side in one state (width `2·hidden`).
    Lstm,
    Rnn,
}

/// Byte order of a pixel in `frame`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ColorOrder {
    /// Three bytes per pixel in R, G, B order.
    #[serde(rename = "rgb")]
    Rgb,
}

/// Layout of the `frame` input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FrameLayout {
    /// `[1, S, S, 3]` bytes; scaling and normalisation are inside the model.
    #[serde(rename = "nhwc-u8")]
    NhwcU8,
}

/// How a frame is resized to the model input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Resize {
    /// Bilinear with Pillow's filter support (`pe_clip_models::preprocess`); a frame already at
    /// the model size passes through.
    #[serde(rename = "bilinear (PIL-exact)")]
    BilinearPilExact,
}

/// One class: its name and the text its feature was computed from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassEntry {
    pub name: String,
    pub text: String,
}

/// The video head: `logits = logit_scale · normalise(mean_t feature_t) · text_featuresᵀ`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
        self.logits_of_sum(&self.feature_sum(features))
    }

    /// The running sum of per-frame `features` (f64, so long windows lose nothing).
    pub fn feature_sum<'a>(&self, features: impl IntoIterator<Item = &'a [f32]>) -> Vec<f64> {
        let mut sum = vec![0f64; self.feature_dim];
        for f in features {
            for (s, v) in sum.iter_mut().zip(f) {
                *s += *v as f64;
            }
        }
        sum
    }

    /// Class logits of a running feature sum (the mean's direction is the sum's).
    pub fn logits_of_sum(&self, sum: &[f64]) -> Vec<f32> {
        pe_clip_calibrate::profile::head_logits(&self.text_features, self.logit_scale, sum)
    }
}

/// How frames are prepared before `frame`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocess {
    /// Square model input in pixels.
    pub image_size: usize,
    pub color: ColorOrder,
    pub layout: FrameLayout,
    /// The normalisation the model applies inside (`none`: x/255, `clip`: CLIP's mean and std).
    pub pixel_norm: PixelNorm,
    pub resize: Resize,
    /// How the face region was chosen for the training clips, in words.
    pub face_crop: String,
}

/// Which frames the model sees.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Temporal {
    /// Sampled frames per prediction (the model was trained on 16-step sequences).
    pub window: usize,
    /// Camera frames between two sampled frames (match the training clips' spacing).
    pub stride: usize,
}

/// One recurrent state pair of the step model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateEntry {
    pub block: usize,
    /// `state_in.<block>` ([`state_input`]).
    pub input: String,
    /// `state_out.<block>` ([`state_output`]).
    pub output: String,
    pub rows: usize,
    pub width: usize,
    pub cell: CellKind,
}

/// What the integer export did and how well it kept the f32 model's answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
#[serde(deny_unknown_fields)]
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
#[serde(deny_unknown_fields)]
pub struct CalibrationSummary {
    pub source: String,
    pub clips: usize,
    pub frames: usize,
    /// SHA-256 over the sorted clip paths (which clips, not their bytes).
    pub clip_list_sha256: String,
}

/// A candidate model against a reference on clips: top-1 agreement and logit cosine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agreement {
    pub clips: usize,
    pub top1_agreement: f64,
    pub logit_cosine_mean: f64,
    pub logit_cosine_min: f64,
}

/// int8 vs f32 on held-out clips: their [`Agreement`] and, with labels, both UARs. (The
/// agreement's fields are spelled out rather than nested so that the manifest stays flat.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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

impl Fidelity {
    pub fn new(source: String, a: Agreement, uar_f32: Option<f64>, uar_int8: Option<f64>) -> Self {
        Self {
            source,
            clips: a.clips,
            top1_agreement: a.top1_agreement,
            logit_cosine_mean: a.logit_cosine_mean,
            logit_cosine_min: a.logit_cosine_min,
            uar_f32,
            uar_int8,
        }
    }

    pub fn agreement(&self) -> Agreement {
        Agreement {
            clips: self.clips,
            top1_agreement: self.top1_agreement,
            logit_cosine_mean: self.logit_cosine_mean,
            logit_cosine_min: self.logit_cosine_min,
        }
    }
}

/// The package before and after a re-calibration, each against the same reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecalibrationCheck {
    pub source: String,
    /// What the int8 models were compared with.
    pub reference: String,
    pub before: Agreement,
    pub after: Agreement,
}

/// Where the package came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// The run directory exported.
    pub checkpoint: String,
    /// SHA-256 of the run's trainable weights file.
    pub checkpoint_sha256: String,
    /// The run's resolved configuration (`peclip.json`; its own schema, kept as written).
    pub config: serde_json::Value,
    /// The pe-clip source revision that wrote the package.
    pub source_revision: String,
    pub pe_clip_version: String,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
}

/// Checksum of one file of the package.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSum {
    /// A plain file name in the package directory (no `/`, not `..`).
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
}

/// The mean per-frame feature of neutral clips of many people (zero state, the package's
/// window), the point a driver's own resting face is measured from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NeutralReference {
    pub feature: Vec<f32>,
    pub source: String,
    pub clips: usize,
    pub frames: usize,
}

/// The name every package's neutral class has (driver profiles measure from it).
pub const NEUTRAL: &str = "neutral";

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub precision: Precision,
    /// The step model's file name ([`MODEL_FILE`] as written by pe-clip).
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

impl Manifest {
    /// Parse manifest bytes: the format and version first (so that another version is named as
    /// such, not as a schema error), then the schema, then [`Manifest::validate`].
    pub fn parse(bytes: &[u8]) -> Result<Self, ManifestError> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(ManifestError::Json)?;
        match value.get("format").and_then(|v| v.as_str()) {
            Some(PACKAGE_FORMAT) => {}
            other => return Err(ManifestError::Format(other.map(str::to_string))),
        }
        let found = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
        if found != PACKAGE_VERSION as u64 {
            return Err(ManifestError::Version { found });
        }
        let manifest: Manifest = serde_json::from_value(value).map_err(ManifestError::Schema)?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Everything that can be checked without the model file: sizes within [`limits`], a
    /// window and stride of at least 1, one finite head row of `feature_dim` values per class,
    /// unique class names, the state entries named as the step model names them in increasing
    /// block order, an int8 package's quantization record, a neutral reference of the feature
    /// width, plain checksum file names including the model's.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let within = |key: &str, v: usize, max: usize| {
            if v == 0 || v > max {
                Err(invalid(key, format!("{v} is outside 1 to {max}")))
            } else {
                Ok(())
            }
        };
        within(
            "preprocess.image_size",
            self.preprocess.image_size,
            limits::IMAGE_SIZE,
        )?;
        within("temporal.window", self.temporal.window, limits::WINDOW)?;
        within("temporal.stride", self.temporal.stride, limits::STRIDE)?;
        self.validate_classes_and_head()?;
        self.validate_state()?;
        if self.precision == Precision::Int8 && self.quantization.is_none() {
            return Err(invalid(
                "quantization",
                "an int8 package must say how it was quantized",
            ));
        }
        if let Some(r) = &self.neutral_reference {
            if r.feature.len() != self.head.feature_dim {
                return Err(invalid(
                    "neutral_reference.feature",
                    format!(
                        "{} values for {} features",
                        r.feature.len(),
                        self.head.feature_dim
                    ),
                ));
            }
            if r.feature.iter().any(|v| !v.is_finite()) {
                return Err(invalid(
                    "neutral_reference.feature",
                    "holds a non-finite value",
                ));
            }
        }
        for c in &self.checksums {
            if c.file.is_empty() || c.file.contains(['/', '\\']) || c.file.contains("..") {
                return Err(invalid("checksums", format!("bad file name {:?}", c.file)));
            }
        }
        if !self.checksums.iter().any(|c| c.file == self.model) {
            return Err(invalid(
                "checksums",
                format!("no checksum for {}", self.model),
            ));
        }
        Ok(())
    }

    fn validate_classes_and_head(&self) -> Result<(), ManifestError> {
        let n = self.classes.len();
        if n == 0 || n > limits::CLASSES {
            return Err(invalid(
                "classes",
                format!("{n} classes; a package has 1 to {}", limits::CLASSES),
            ));
        }
        for (i, c) in self.classes.iter().enumerate() {
            if c.name.trim().is_empty() {
                return Err(invalid(format!("classes[{i}].name"), "is empty"));
            }
            if self.classes[..i].iter().any(|o| o.name == c.name) {
                return Err(invalid(
                    format!("classes[{i}].name"),
                    format!("{:?} appears twice", c.name),
                ));
            }
        }
        let h = &self.head;
        if h.feature_dim == 0 || h.feature_dim > limits::FEATURE_DIM {
            return Err(invalid(
                "head.feature_dim",
                format!("{} is outside 1 to {}", h.feature_dim, limits::FEATURE_DIM),
            ));
        }
        if h.text_features.len() != n || h.text_features.iter().any(|r| r.len() != h.feature_dim) {
            return Err(invalid(
                "head.text_features",
                "must have one row of feature_dim values per class",
            ));
        }
        if !(h.logit_scale.is_finite() && h.logit_scale > 0.0) {
            return Err(invalid(
                "head.logit_scale",
                format!("{} is not a positive number", h.logit_scale),
            ));
        }
        if let Some(i) = h
            .text_features
            .iter()
            .position(|r| r.iter().any(|v| !v.is_finite()))
        {
            return Err(invalid(
                format!("head.text_features[{i}]"),
                "holds a non-finite value",
            ));
        }
        Ok(())
    }

    fn validate_state(&self) -> Result<(), ManifestError> {
        let mut floats = 0usize;
        for (i, s) in self.state.iter().enumerate() {
            let key = format!("state[{i}]");
            if i > 0 && s.block <= self.state[i - 1].block {
                return Err(invalid(key, "blocks must increase"));
            }
            if s.input != state_input(s.block) || s.output != state_output(s.block) {
                return Err(invalid(
                    key,
                    format!(
                        "block {} must be read from {} and written to {} (found {} and {})",
                        s.block,
                        state_input(s.block),
                        state_output(s.block),
                        s.input,
                        s.output
                    ),
                ));
            }
            floats = s
                .rows
                .checked_mul(s.width)
                .filter(|_| s.rows > 0 && s.width > 0)
                .and_then(|f| floats.checked_add(f))
                .filter(|&f| f <= limits::STATE_FLOATS)
                .ok_or_else(|| {
                    invalid(
                        key,
                        format!(
                            "{} x {} state: every state needs rows and width, {} floats at most \
                             in all",
                            s.rows,
                            s.width,
                            limits::STATE_FLOATS
                        ),
                    )
                })?;
        }
        Ok(())
    }

    /// Class names in logit order.
    pub fn class_names(&self) -> Vec<String> {
        self.classes.iter().map(|c| c.name.clone()).collect()
    }

    /// The index of the class named [`NEUTRAL`], if there is one.
    pub fn neutral_class(&self) -> Option<usize> {
        self.classes.iter().position(|c| c.name == NEUTRAL)
    }

    /// The model file's checksum entry (present: [`Manifest::validate`] requires it).
    pub fn model_checksum(&self) -> Option<&FileSum> {
        self.checksums.iter().find(|c| c.file == self.model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEMO: &[u8] = include_bytes!("../../demo/manifest.json");

    fn demo_value() -> serde_json::Value {
        serde_json::from_slice(DEMO).unwrap()
    }

    fn parse(v: &serde_json::Value) -> Result<Manifest, ManifestError> {
        Manifest::parse(&serde_json::to_vec(v).unwrap())
    }

    #[test]
    fn the_demo_manifest_parses_with_typed_values_and_writes_back_the_same() {
        let m = Manifest::parse(DEMO).unwrap();
        assert_eq!(m.precision, Precision::Int8);
        assert_eq!(m.preprocess.layout, FrameLayout::NhwcU8);
        assert_eq!(m.preprocess.resize, Resize::BilinearPilExact);
        assert!(m.state.iter().all(|s| s.cell == CellKind::Gru));
        assert_eq!(m.neutral_class(), Some(2));
        // The typed manifest writes the very bytes the exporter wrote with free strings.
        let again = serde_json::to_vec_pretty(&m).unwrap();
        assert_eq!(
            String::from_utf8(again).unwrap().trim_end(),
            std::str::from_utf8(DEMO).unwrap().trim_end()
        );
    }

    /// Each edit of the demo manifest is refused, naming the key at fault.
    #[test]
    fn a_manifest_that_asks_for_the_wrong_thing_is_refused_by_key() {
        type Edit = fn(&mut serde_json::Value);
        let cases: [(Edit, &str); 12] = [
            (|v| v["extra"] = 1.into(), "unknown field `extra`"),
            (
                |v| v["preprocess"]["colour"] = "rgb".into(),
                "unknown field `colour`",
            ),
            (|v| v["precision"] = "int4".into(), "unknown variant `int4`"),
            (
                |v| v["state"][0]["cell"] = "gru2".into(),
                "unknown variant `gru2`",
            ),
            (
                |v| v["preprocess"]["layout"] = "nchw".into(),
                "unknown variant `nchw`",
            ),
            (|v| v["temporal"]["window"] = 0.into(), "temporal.window"),
            (|v| v["temporal"]["stride"] = 5000.into(), "temporal.stride"),
            (
                |v| v["preprocess"]["image_size"] = 1_000_000.into(),
                "preprocess.image_size",
            ),
            (
                |v| v["classes"][1]["name"] = "happiness".into(),
                "classes[1].name",
            ),
            (
                |v| v["head"]["text_features"][3] = serde_json::json!([0.5]),
                "head.text_features",
            ),
            (|v| v["state"][1]["input"] = "state_in.0".into(), "state[1]"),
            (|v| v["state"][0]["rows"] = 0.into(), "state[0]"),
        ];
        for (edit, needle) in cases {
            let mut v = demo_value();
            edit(&mut v);
            let e = parse(&v).unwrap_err().to_string();
            assert!(e.contains(needle), "{e} (wanted {needle})");
        }
        let mut v = demo_value();
        v["classes"] = serde_json::json!([]);
        v["head"]["text_features"] = serde_json::json!([]);
        assert!(parse(&v).unwrap_err().to_string().contains("0 classes"));
        let mut v = demo_value();
        v["quantization"] = serde_json::Value::Null;
        assert!(parse(&v).unwrap_err().to_string().contains("quantization"));
        let mut v = demo_value();
        v["checksums"][0]["file"] = "../model.onnx".into();
        assert!(parse(&v).unwrap_err().to_string().contains("bad file name"));
        let mut v = demo_value();
        v["version"] = 2.into();
        assert!(matches!(
            parse(&v),
            Err(ManifestError::Version { found: 2 })
        ));
    }

    #[test]
    fn non_finite_head_values_are_refused() {
        let mut m = Manifest::parse(DEMO).unwrap();
        m.head.text_features[4][7] = f32::NAN;
        assert!(m
            .validate()
            .unwrap_err()
            .to_string()
            .contains("head.text_features[4]"));
        let mut m = Manifest::parse(DEMO).unwrap();
        m.head.logit_scale = f32::INFINITY;
        assert!(m
            .validate()
            .unwrap_err()
            .to_string()
            .contains("head.logit_scale"));
    }
}

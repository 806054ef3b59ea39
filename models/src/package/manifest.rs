//! `manifest.json` of a model package: what the step model is, how to feed it and how to read
//! its output. Parsed strictly (`deny_unknown_fields`, typed enums for every closed set of
//! values) and checked by [`Manifest::validate`] before anything else reads it.

use serde::{Deserialize, Serialize};

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

/// The step model's arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    /// f16 weights and products in the linear layers, the rest f32 (`half` says which).
    F16,
    /// int8 linear layers (`quantization` says how).
    Int8,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
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

/// A reduced-precision model (int8 or f16) vs the f32 one on held-out clips: their
/// [`Agreement`] and, with labels, both UARs. (The
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
    /// The reduced-precision model's UAR (`uar_int8` in packages written before f16 existed).
    #[serde(alias = "uar_int8")]
    pub uar_reduced: Option<f64>,
}

impl Fidelity {
    pub fn new(
        source: String,
        a: Agreement,
        uar_f32: Option<f64>,
        uar_reduced: Option<f64>,
    ) -> Self {
        Self {
            source,
            clips: a.clips,
            top1_agreement: a.top1_agreement,
            logit_cosine_mean: a.logit_cosine_mean,
            logit_cosine_min: a.logit_cosine_min,
            uar_f32,
            uar_reduced,
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

/// An f16 package's conversion: which products are f16, what stays f32, and the check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HalfPrecision {
    /// What is f16 and what is not, in words.
    pub scheme: String,
    /// Linear layers (constant-weight `MatMul`s) computed in f16.
    pub matmuls: usize,
    /// The f16 model against the f32 one on held-out clips.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fidelity: Option<Fidelity>,
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
    /// How an f16 package's model was made (`precision` f16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub half: Option<HalfPrecision>,
    pub provenance: Provenance,
    /// The population's resting face in feature space, for driver profiles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neutral_reference: Option<NeutralReference>,
    pub checksums: Vec<FileSum>,
}

impl Manifest {
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
        // A package written before f16 spells the reduced model's UAR `uar_int8`.
        let old = std::str::from_utf8(DEMO)
            .unwrap()
            .replace("\"uar_reduced\"", "\"uar_int8\"");
        assert_eq!(Manifest::parse(old.as_bytes()).unwrap(), m);
    }
}

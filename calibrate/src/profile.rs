//! Driver profiles: a small correction of the video head fitted to one driver from a few of their
//! own clips.
//!
//! The head scores a window by `logits = s · normalise(Σ_t f_t) · Tᵀ` (per-frame features `f_t`,
//! class text features `T`, logit scale `s`). A driver whose resting face already looks like an
//! expression (a lowered brow, down-turned lip corners) moves every one of their features by about
//! the same amount, so their neutral windows score as sadness or anger. The profile undoes that:
//!
//! 1. **Neutral offset.** `δ = Σ_i (m_i − μ₀) / (k + κ)`: `m_i` is the coordinate-wise median of
//!    the per-frame features of the driver's `i`-th neutral clip (k of them; the median ignores a
//!    blink, a word or a brief expression), `μ₀` the mean of the same over neutral clips of many
//!    people (stored in the model package), and `κ` a prior of that many zero-offset clips
//!    that shrinks the estimate when there is little data (`κ = 1`: one clip gives half its measured
//!    offset, three give 75 %; chosen on synthetic drivers, where it beat 0.25, 0.5, 1.5 and 3 both
//!    for shifted drivers' gain and for unshifted drivers' loss). Every frame's feature becomes
//!    `f_t − δ`, i.e. the window sum `Σ f_t − n·δ`.
//! 2. **Class bias (optional).** With labelled clips of at least two classes, a per-class logit
//!    bias `b` minimises the mean cross-entropy of the offset-corrected clip logits plus
//!    `λ/2·‖b‖²` (`λ = 0.05`, the logits being on CLIP's scale of 100 per unit cosine). With
//!    neutral clips only, `b = 0`: a bias fitted to one class would only push every window
//!    towards it.
//!
//! Both are exact functions of the window's feature sum, so streaming, partial windows and the
//! continuous mode apply them the same way.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// `format` of every profile file.
pub const PROFILE_FORMAT: &str = "pe-clip-driver-profile";
/// The profile version this build writes and the newest it reads.
pub const PROFILE_VERSION: u32 = 1;

/// The cosine head: class logits of a window's feature sum.
pub fn head_logits(text_features: &[Vec<f32>], logit_scale: f32, sum: &[f64]) -> Vec<f32> {
    let norm = sum.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
    text_features
        .iter()
        .map(|t| {
            let dot: f64 = t.iter().zip(sum).map(|(a, b)| *a as f64 * b).sum();
            (logit_scale as f64 * dot / norm) as f32
        })
        .collect()
}

/// Which model a profile was fitted for: its features only mean something to that model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelBinding {
    /// The package's `provenance.checkpoint_sha256` (unchanged by range re-calibration).
    pub checkpoint_sha256: String,
    pub feature_dim: usize,
    pub classes: Vec<String>,
}

/// How a profile was fitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FitSummary {
    /// Clips per class (class name, count), in class order, classes without clips left out.
    pub clips: Vec<(String, usize)>,
    pub frames: usize,
    /// The prior strength `κ` of the offset, in clips.
    pub shrinkage: f32,
    /// The bias penalty `λ` (absent: no bias fitted).
    pub bias_l2: Option<f32>,
    /// On the fitting clips: accuracy without and with the profile (optimistic: not held out).
    pub fit_accuracy_before: f64,
    pub fit_accuracy_after: f64,
    /// Where the clips came from.
    pub source: String,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
}

/// A driver's correction of the head (see the module documentation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriverProfile {
    pub format: String,
    pub version: u32,
    pub name: String,
    pub model: ModelBinding,
    /// `neutral-offset` or `neutral-offset+bias`.
    pub method: String,
    /// `δ`, subtracted from every per-frame feature.
    pub offset: Vec<f32>,
    /// `b`, added to the logits (zeros without labelled clips of two classes).
    pub bias: Vec<f32>,
    pub fit: FitSummary,
}

/// One clip of the driver: its class, its per-frame features' sum and count (what the head
/// scores) and their coordinate-wise median (where the face rests: a blink, a word or a brief
/// expression in a few frames does not move it).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipFeatures {
    pub label: usize,
    pub sum: Vec<f64>,
    pub frames: usize,
    pub center: Vec<f64>,
}

impl ClipFeatures {
    /// A clip's features from its per-frame features.
    pub fn of_frames(label: usize, frames: &[Vec<f32>]) -> Self {
        let dim = frames.first().map_or(0, Vec::len);
        let mut sum = vec![0f64; dim];
        for f in frames {
            for (s, v) in sum.iter_mut().zip(f) {
                *s += *v as f64;
            }
        }
        Self {
            label,
            sum,
            frames: frames.len(),
            center: coordinate_median(frames),
        }
    }
}

/// The coordinate-wise median of equally long vectors (the mean of the two middle values for an
/// even count).
pub fn coordinate_median(rows: &[Vec<f32>]) -> Vec<f64> {
    let dim = rows.first().map_or(0, Vec::len);
    let mut col = Vec::with_capacity(rows.len());
    (0..dim)
        .map(|j| {
            col.clear();
            col.extend(rows.iter().map(|r| r[j] as f64));
            col.sort_by(f64::total_cmp);
            let n = col.len();
            if n == 0 {
                0.0
            } else if n % 2 == 1 {
                col[n / 2]
            } else {
                0.5 * (col[n / 2 - 1] + col[n / 2])
            }
        })
        .collect()
}

/// Fitting parameters (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FitOptions {
    /// `κ`, in clips.
    pub shrinkage: f32,
    /// `λ`; `None`: never fit a bias.
    pub bias_l2: Option<f32>,
    /// Index of the neutral class.
    pub neutral: usize,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            shrinkage: 1.0,
            bias_l2: Some(0.05),
            neutral: 2,
        }
    }
}

/// The fitted correction: offset and bias, and whether a bias was fitted.
#[derive(Debug, Clone, PartialEq)]
pub struct Correction {
    pub offset: Vec<f32>,
    pub bias: Vec<f32>,
    pub bias_fitted: bool,
}

impl Correction {
    /// No correction for a head of `dim` features and `classes` classes.
    pub fn none(dim: usize, classes: usize) -> Self {
        Self {
            offset: vec![0.0; dim],
            bias: vec![0.0; classes],
            bias_fitted: false,
        }
    }

    /// Logits of a window whose per-frame features sum to `sum` over `frames` frames.
    pub fn logits(
        &self,
        text_features: &[Vec<f32>],
        logit_scale: f32,
        sum: &[f64],
        frames: usize,
    ) -> Vec<f32> {
        let n = frames as f64;
        let corrected: Vec<f64> = sum
            .iter()
            .zip(&self.offset)
            .map(|(s, d)| s - n * *d as f64)
            .collect();
        let mut l = head_logits(text_features, logit_scale, &corrected);
        for (v, b) in l.iter_mut().zip(&self.bias) {
            *v += b;
        }
        l
    }
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

/// Fit a correction to `clips` of one driver against the population's neutral mean `reference`.
/// Errors (as text) when no clip is of the neutral class or a size does not match.
pub fn fit(
    clips: &[ClipFeatures],
    reference: &[f32],
    text_features: &[Vec<f32>],
    logit_scale: f32,
    opts: &FitOptions,
) -> Result<Correction> {
    let dim = reference.len();
    let classes = text_features.len();
    if let Some(c) = clips
        .iter()
        .find(|c| c.sum.len() != dim || c.center.len() != dim || c.label >= classes)
    {
        return Err(Error::ClipShape {
            label: c.label,
            features: c.sum.len(),
            classes,
            dim,
        });
    }
    if !(opts.shrinkage >= 0.0 && opts.shrinkage.is_finite()) {
        return Err(Error::Shrinkage(opts.shrinkage));
    }
    let neutral: Vec<&ClipFeatures> = clips.iter().filter(|c| c.label == opts.neutral).collect();
    if neutral.is_empty() {
        return Err(Error::NoNeutralClip);
    }
    let k = neutral.len() as f64;
    let mut offset = vec![0f64; dim];
    for c in &neutral {
        for ((o, m), r) in offset.iter_mut().zip(&c.center).zip(reference) {
            *o += m - *r as f64;
        }
    }
    let denom = k + opts.shrinkage as f64;
    let mut corr = Correction {
        offset: offset.iter().map(|o| (o / denom) as f32).collect(),
        bias: vec![0.0; classes],
        bias_fitted: false,
    };
    let distinct = {
        let mut seen = vec![false; classes];
        for c in clips {
            seen[c.label] = true;
        }
        seen.iter().filter(|s| **s).count()
    };
    if let (Some(lambda), true) = (opts.bias_l2, distinct >= 2) {
        if !(lambda > 0.0 && lambda.is_finite()) {
            return Err(Error::BiasPenalty(lambda));
        }
        let z: Vec<Vec<f32>> = clips
            .iter()
            .map(|c| corr.logits(text_features, logit_scale, &c.sum, c.frames))
            .collect();
        corr.bias = fit_bias(&z, clips, classes, lambda as f64);
        corr.bias_fitted = true;
    }
    Ok(corr)
}

/// `argmin_b mean_i CE(z_i + b, y_i) + λ/2·‖b‖²` by gradient descent (the objective is convex
/// with curvature between λ and λ + 1/2).
fn fit_bias(z: &[Vec<f32>], clips: &[ClipFeatures], classes: usize, lambda: f64) -> Vec<f32> {
    let mut b = vec![0f64; classes];
    let lr = 1.0 / (0.5 + lambda);
    let n = z.len().max(1) as f64;
    for _ in 0..2000 {
        let mut grad: Vec<f64> = b.iter().map(|v| lambda * v).collect();
        for (zi, c) in z.iter().zip(clips) {
            let l: Vec<f64> = zi.iter().zip(&b).map(|(a, b)| *a as f64 + b).collect();
            let m = l.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = l.iter().map(|v| (v - m).exp()).collect();
            let s: f64 = e.iter().sum();
            for (j, g) in grad.iter_mut().enumerate() {
                *g += (e[j] / s - (j == c.label) as u8 as f64) / n;
            }
        }
        let step: f64 = grad.iter().map(|g| g * g).sum::<f64>().sqrt();
        for (v, g) in b.iter_mut().zip(&grad) {
            *v -= lr * g;
        }
        if step < 1e-7 {
            break;
        }
    }
    b.into_iter().map(|v| v as f32).collect()
}

/// Accuracy of `corr` on `clips` (the fraction whose top logit is their label).
pub fn accuracy(
    clips: &[ClipFeatures],
    corr: &Correction,
    text_features: &[Vec<f32>],
    logit_scale: f32,
) -> f64 {
    if clips.is_empty() {
        return 0.0;
    }
    let right = clips
        .iter()
        .filter(|c| argmax(&corr.logits(text_features, logit_scale, &c.sum, c.frames)) == c.label)
        .count();
    right as f64 / clips.len() as f64
}

impl DriverProfile {
    /// The correction this profile applies.
    pub fn correction(&self) -> Correction {
        Correction {
            offset: self.offset.clone(),
            bias: self.bias.clone(),
            bias_fitted: self.method.ends_with("+bias"),
        }
    }

    /// Check the format, version, sizes and values, and that it was fitted for `model`.
    pub fn validate(&self, model: &ModelBinding) -> Result<()> {
        if self.format != PROFILE_FORMAT {
            return Err(Error::ProfileFormat(self.format.clone()));
        }
        if self.version != PROFILE_VERSION {
            return Err(Error::ProfileVersion(self.version));
        }
        if self.model.checkpoint_sha256 != model.checkpoint_sha256
            || self.model.classes != model.classes
            || self.model.feature_dim != model.feature_dim
        {
            let describe = |m: &ModelBinding| {
                format!(
                    "checkpoint {}, {} classes, {} features",
                    short(&m.checkpoint_sha256),
                    m.classes.len(),
                    m.feature_dim
                )
            };
            return Err(Error::OtherModel {
                profile: describe(&self.model),
                package: describe(model),
            });
        }
        if self.offset.len() != model.feature_dim || self.bias.len() != model.classes.len() {
            return Err(Error::ProfileShape {
                offset: self.offset.len(),
                bias: self.bias.len(),
                features: model.feature_dim,
                classes: model.classes.len(),
            });
        }
        if self.offset.iter().chain(&self.bias).any(|v| !v.is_finite()) {
            return Err(Error::NonFinite);
        }
        Ok(())
    }
}

fn short(s: &str) -> &str {
    s.get(..12).unwrap_or(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text() -> Vec<Vec<f32>> {
        // Three classes on three axes; class 1 is "neutral".
        vec![
            vec![1.0, 0.0, 0.0],
            vec![0.0, 1.0, 0.0],
            vec![0.0, 0.0, 1.0],
        ]
    }

    fn clip(label: usize, mean: [f64; 3], frames: usize) -> ClipFeatures {
        ClipFeatures {
            label,
            sum: mean.iter().map(|m| m * frames as f64).collect(),
            frames,
            center: mean.to_vec(),
        }
    }

    /// The median ignores a brief expression that moves the mean.
    #[test]
    fn clip_centers_are_medians() {
        let mut frames = vec![vec![1.0f32, 0.0]; 13];
        frames.extend(vec![vec![9.0f32, 5.0]; 3]);
        let c = ClipFeatures::of_frames(2, &frames);
        assert_eq!(c.center, vec![1.0, 0.0]);
        assert_eq!(c.sum, vec![13.0 + 27.0, 15.0]);
        assert_eq!(c.frames, 16);
        assert_eq!(coordinate_median(&[vec![1.0], vec![4.0]]), vec![2.5]);
    }

    /// A driver whose features are all moved towards class 0 is corrected by the neutral
    /// offset: their neutral clip is neutral again, their class-2 clip stays class 2.
    #[test]
    fn the_neutral_offset_undoes_a_shifted_resting_face() {
        let reference = [0.1f32, 1.0, 0.1];
        let shift = [0.9, 0.0, 0.0];
        let add = |m: [f64; 3]| [m[0] + shift[0], m[1] + shift[1], m[2] + shift[2]];
        let neutral = clip(1, add([0.1, 1.0, 0.1]), 16);
        let other = clip(2, add([0.1, 0.4, 1.0]), 16);
        let none = Correction::none(3, 3);
        let opts = FitOptions {
            shrinkage: 0.0,
            bias_l2: None,
            neutral: 1,
        };
        assert_eq!(argmax(&none.logits(&text(), 100.0, &neutral.sum, 16)), 0);
        let c = fit(
            std::slice::from_ref(&neutral),
            &reference,
            &text(),
            100.0,
            &opts,
        )
        .unwrap();
        for (o, s) in c.offset.iter().zip(shift) {
            assert!((*o as f64 - s).abs() < 1e-6, "{:?}", c.offset);
        }
        assert!(!c.bias_fitted);
        assert_eq!(argmax(&c.logits(&text(), 100.0, &neutral.sum, 16)), 1);
        assert_eq!(argmax(&c.logits(&text(), 100.0, &other.sum, 16)), 2);
        // Shrinkage scales the offset by k / (k + κ).
        let half = fit(
            &[neutral],
            &reference,
            &text(),
            100.0,
            &FitOptions {
                shrinkage: 1.0,
                ..opts
            },
        )
        .unwrap();
        assert!((half.offset[0] - 0.45).abs() < 1e-6);
    }

    /// With clips of two classes a bias is fitted: it fixes a confusion the offset cannot, and
    /// the penalty keeps it small.
    #[test]
    fn the_bias_fixes_a_class_confusion_and_is_regularised() {
        let reference = [0.0f32, 1.0, 0.0];
        // Class 2 windows of this driver score slightly as class 0.
        let clips = vec![
            clip(1, [0.0, 1.0, 0.0], 8),
            clip(2, [0.52, 0.0, 0.5], 8),
            clip(2, [0.51, 0.0, 0.5], 8),
            clip(0, [0.9, 0.0, 0.3], 8),
        ];
        let none = Correction::none(3, 3);
        assert!(accuracy(&clips, &none, &text(), 100.0) < 0.99);
        let mut sizes = Vec::new();
        for lambda in [0.01f32, 1.0] {
            let c = fit(
                &clips,
                &reference,
                &text(),
                100.0,
                &FitOptions {
                    shrinkage: 0.25,
                    bias_l2: Some(lambda),
                    neutral: 1,
                },
            )
            .unwrap();
            assert!(c.bias_fitted);
            sizes.push(c.bias.iter().map(|b| b * b).sum::<f32>().sqrt());
            if lambda < 0.1 {
                assert_eq!(accuracy(&clips, &c, &text(), 100.0), 1.0, "{c:?}");
            }
        }
        assert!(sizes[1] < sizes[0], "{sizes:?}");
    }

    #[test]
    fn fitting_without_a_neutral_clip_or_with_wrong_sizes_is_an_error() {
        let opts = FitOptions {
            neutral: 1,
            ..FitOptions::default()
        };
        let e = fit(
            &[clip(0, [1.0, 0.0, 0.0], 4)],
            &[0.0; 3],
            &text(),
            1.0,
            &opts,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("neutral"), "{e}");
        let e = fit(
            &[clip(1, [1.0, 0.0, 0.0], 4)],
            &[0.0; 2],
            &text(),
            1.0,
            &opts,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("does not fit"), "{e}");
    }

    #[test]
    fn validation_names_what_is_wrong() {
        let model = ModelBinding {
            checkpoint_sha256: "a".repeat(64),
            feature_dim: 3,
            classes: vec!["x".into(), "neutral".into(), "z".into()],
        };
        let p = DriverProfile {
            format: PROFILE_FORMAT.into(),
            version: PROFILE_VERSION,
            name: "anna".into(),
            model: model.clone(),
            method: "neutral-offset".into(),
            offset: vec![0.1; 3],
            bias: vec![0.0; 3],
            fit: FitSummary {
                clips: vec![("neutral".into(), 1)],
                frames: 16,
                shrinkage: 0.25,
                bias_l2: None,
                fit_accuracy_before: 0.0,
                fit_accuracy_after: 1.0,
                source: "test".into(),
                created_unix: 0,
            },
        };
        p.validate(&model).unwrap();
        let other = ModelBinding {
            checkpoint_sha256: "b".repeat(64),
            ..model.clone()
        };
        assert!(p
            .validate(&other)
            .unwrap_err()
            .to_string()
            .contains("another model"));
        let bad = DriverProfile {
            version: 7,
            ..p.clone()
        };
        assert!(bad
            .validate(&model)
            .unwrap_err()
            .to_string()
            .contains("version 7"));
        let bad = DriverProfile {
            offset: vec![f32::NAN; 3],
            ..p.clone()
        };
        assert!(bad
            .validate(&model)
            .unwrap_err()
            .to_string()
            .contains("finite"));
        let bad = DriverProfile {
            bias: vec![0.0; 2],
            ..p
        };
        assert!(bad
            .validate(&model)
            .unwrap_err()
            .to_string()
            .contains("bias of 2"));
    }
}

//! The per-clip result every recognition command prints.

use serde::Serialize;

/// Class scores of one clip.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    /// The clip path as given.
    pub clip: String,
    /// One logit per class, in class order.
    pub logits: Vec<f32>,
    /// Softmax of the logits.
    pub probs: Vec<f32>,
    /// The most probable class.
    pub label: String,
    /// Frames of the clip that could not be read.
    pub skipped_frames: usize,
}

impl Prediction {
    /// Build from logits and the class names.
    pub fn new(clip: String, logits: Vec<f32>, names: &[&str], skipped_frames: usize) -> Self {
        let probs = softmax(&logits);
        let label = names
            .get(argmax(&probs))
            .map_or_else(String::new, |s| s.to_string());
        Self {
            clip,
            logits,
            probs,
            label,
            skipped_frames,
        }
    }
}

/// Softmax of a slice, stable for any finite logits (the maximum is subtracted) and accumulated
/// in f64 (the runtime's probabilities and every command's agree to the last digit).
pub fn softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f64> = x.iter().map(|v| ((v - max) as f64).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| (v / s) as f32).collect()
}

/// Index of the largest value (the first one on ties).
pub fn argmax(x: &[f32]) -> usize {
    x.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_and_label() {
        let p = Prediction::new("c".into(), vec![1.0, 3.0, 2.0], &["a", "b", "c"], 0);
        assert_eq!(p.label, "b");
        assert!((p.probs.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(p.probs[1] > p.probs[2] && p.probs[2] > p.probs[0]);
    }
}

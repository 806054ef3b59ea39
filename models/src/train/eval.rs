//! Evaluation during training: test-time sampling, no augmentation, the inference view of the
//! model.

use candle_core::Tensor;
use rayon::prelude::*;

use crate::dataset::{Dataset, Sample};
use crate::error::Result;
use crate::metrics::{Confusion, Metrics};
use crate::peclip::{GruMode, PeClip};
use crate::prediction::argmax;
use crate::preprocess::PreprocessSpec;
use crate::sampling::test_indices;
use crate::video::load_clip_sampled_by;
use crate::zero_shot::l2_normalize;

/// A test clip: test-time sampling, no augmentation.
fn load_test_clip(sample: &Sample, segments: usize, spec: &PreprocessSpec) -> Result<Vec<f32>> {
    let clip = load_clip_sampled_by(&sample.clip, |n| test_indices(n, segments))?;
    Ok(clip
        .frames
        .iter()
        .flat_map(|f| spec.frame_to_chw(f))
        .collect())
}

/// Evaluate `model` (an inference view) on `data` with test-time sampling.
pub fn evaluate(
    model: &PeClip,
    data: &Dataset,
    segments: usize,
    spec: &PreprocessSpec,
) -> Result<Metrics> {
    let text = l2_normalize(&model.text_features()?)?;
    let mut confusion = Confusion::new(model.classes.len());
    let s = spec.image_size;
    for chunk in data.samples.chunks(4) {
        let loaded: Vec<Result<Vec<f32>>> = chunk
            .par_iter()
            .map(|x| load_test_clip(x, segments, spec))
            .collect();
        for (sample, pixels) in chunk.iter().zip(loaded) {
            let v = Tensor::from_vec(pixels?, (1, segments, 3, s, s), &model.clip.device)?;
            let logits = model
                .forward_with_text(&v, GruMode::PerVideo, &text)?
                .squeeze(0)?
                .to_vec1::<f32>()?;
            confusion.add(sample.label, argmax(&logits));
        }
    }
    Ok(confusion.metrics())
}

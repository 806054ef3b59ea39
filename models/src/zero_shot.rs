//! Zero-shot expression recognition with plain CLIP and the action-unit texts.
//!
//! Per clip: the projected image feature of each sampled frame, mean over frames, L2-normalised,
//! cosine with the L2-normalised text features of the class texts, times `exp(logit_scale)` from
//! the checkpoint; softmax probabilities.

use std::path::Path;

use candle_core::{Device, Tensor, D};

use crate::classes::ClassSet;
use crate::clip::ClipModel;
use crate::error::Result;
use crate::prediction::Prediction;
use crate::preprocess::PreprocessSpec;
use crate::tokenizer::ClipTokenizer;
use crate::video::{load_sampled_clip, SampledClip};

/// A CLIP model with its class texts encoded once.
pub struct ZeroShot {
    pub model: ClipModel,
    pub classes: ClassSet,
    /// L2-normalised text features `[C, E]`.
    pub text_features: Tensor,
    pub preprocess: PreprocessSpec,
    pub segments: usize,
}

/// L2-normalise the rows of `x` `[N, E]`.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

impl ZeroShot {
    /// Load the model in `dir`, tokenize and encode the class descriptors.
    pub fn new(
        dir: &Path,
        classes: ClassSet,
        preprocess: PreprocessSpec,
        segments: usize,
        device: &Device,
    ) -> Result<Self> {
        let model = ClipModel::load(dir, device)?;
        let tokenizer = ClipTokenizer::from_hf_dir_or_embedded(dir)?;
        Self::with_model(model, &tokenizer, classes, preprocess, segments)
    }

    /// Build from a loaded model and tokenizer.
    pub fn with_model(
        model: ClipModel,
        tokenizer: &ClipTokenizer,
        classes: ClassSet,
        mut preprocess: PreprocessSpec,
        segments: usize,
    ) -> Result<Self> {
        preprocess.image_size = model.config.vision_config.image_size;
        let ids: Vec<Vec<u32>> = classes
            .descriptors()
            .iter()
            .map(|t| tokenizer.tokenize(t).0)
            .collect();
        let text_features = l2_normalize(&model.text_features(&ids)?)?;
        Ok(Self {
            model,
            classes,
            text_features,
            preprocess,
            segments,
        })
    }

    /// Preprocess sampled frames into a pixel tensor `[T, 3, S, S]`.
    pub fn pixels(&self, clip: &SampledClip) -> Result<Tensor> {
        pixels_of(clip, &self.preprocess, &self.model.device)
    }

    /// Logits `[C]` of a clip given its pixels `[T, 3, S, S]`.
    pub fn logits(&self, pixels: &Tensor) -> Result<Vec<f32>> {
        let feats = self.model.image_features(pixels)?;
        let video = l2_normalize(&feats.mean_keepdim(0)?)?;
        let cos = video.matmul(&self.text_features.t()?)?.squeeze(0)?;
        let scale = f64::from(self.model.logit_scale).exp();
        Ok((cos * scale)?.to_vec1::<f32>()?)
    }

    /// Load, sample, preprocess and classify one clip.
    pub fn classify(&self, path: &Path) -> Result<Prediction> {
        let clip = load_sampled_clip(path, self.segments)?;
        let logits = self.logits(&pixels_of(&clip, &self.preprocess, &self.model.device)?)?;
        Ok(Prediction::new(
            path.display().to_string(),
            logits,
            &self.classes.names(),
            clip.skipped.len(),
        ))
    }
}

/// Preprocess sampled frames into a pixel tensor `[T, 3, S, S]` on `device`.
pub fn pixels_of(clip: &SampledClip, spec: &PreprocessSpec, device: &Device) -> Result<Tensor> {
    let s = spec.image_size;
    let data: Vec<f32> = clip
        .frames
        .iter()
        .flat_map(|f| spec.frame_to_chw(f))
        .collect();
    Ok(Tensor::from_vec(
        data,
        (clip.frames.len(), 3, s, s),
        device,
    )?)
}

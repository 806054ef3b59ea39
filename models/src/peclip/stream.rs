//! Frame-by-frame inference with an explicit state (reference section 10).
//!
//! The only cross-frame operations in PE-CLIP are the per-block recurrences of the TDAs and the
//! mean over frames, both causal. So a video can be fed one frame at a time, carrying a
//! [`StreamState`] in and out, and gives the batched per-video result up to float reduction
//! order.

use candle_core::Tensor;

use super::adapter::CellState;
use super::model::PeClip;
use crate::error::{Error, Result};
use crate::zero_shot::l2_normalize;

/// Everything one video stream carries from frame to frame.
#[derive(Debug, Clone)]
pub struct StreamState {
    /// Per vision block, the TDA recurrent state of every token row (`h` `[1, L, H]`, plus `c`
    /// for an LSTM); `None` before the first frame and for blocks without a recurrent TDA.
    pub blocks: Vec<Option<CellState>>,
    /// Sum of the projected per-frame features `[1, E]` (None before the first frame).
    pub feature_sum: Option<Tensor>,
    /// Frames seen.
    pub frames: usize,
}

impl StreamState {
    /// The state before the first frame (h0 = 0 everywhere).
    pub fn new(model: &PeClip) -> Self {
        Self {
            blocks: vec![None; model.clip.vision.layers.len()],
            feature_sum: None,
            frames: 0,
        }
    }

    /// Mean of the features seen so far, `[1, E]`.
    pub fn mean_feature(&self) -> Result<Tensor> {
        match &self.feature_sum {
            Some(s) if self.frames > 0 => Ok((s / self.frames as f64)?),
            _ => Err(Error::Config("no frame has been stepped yet".into())),
        }
    }
}

/// Per-stream constants of a model (the vision prompts of every depth and the normalised class
/// features), computed once.
pub struct Streamer<'a> {
    pub model: &'a PeClip,
    vprompts: Vec<Tensor>,
    text: Tensor,
}

impl<'a> Streamer<'a> {
    /// Precompute the constants of `model`.
    pub fn new(model: &'a PeClip) -> Result<Self> {
        Ok(Self {
            model,
            vprompts: model.vision_prompts()?,
            text: l2_normalize(&model.text_features()?)?,
        })
    }

    /// Feed one frame `[3, S, S]` (normalised pixels): its projected feature `[1, E]` and the
    /// next state.
    pub fn step(&self, frame: &Tensor, state: StreamState) -> Result<(Tensor, StreamState)> {
        let m = self.model;
        let mut x = m.vision_input(&frame.unsqueeze(0)?, &self.vprompts)?;
        let mut blocks = Vec::with_capacity(state.blocks.len());
        for (i, st) in state.blocks.into_iter().enumerate() {
            let (next, st) = m.vision_block(i, &x, &self.vprompts, 1, st)?;
            x = next;
            blocks.push(st);
        }
        let feature = m.clip.vision.pool(&x)?;
        let feature_sum = Some(match state.feature_sum {
            Some(s) => (s + &feature)?,
            None => feature.clone(),
        });
        Ok((
            feature,
            StreamState {
                blocks,
                feature_sum,
                frames: state.frames + 1,
            },
        ))
    }

    /// Logits `[C]` of the frames stepped so far (the mean feature against the class texts).
    pub fn logits(&self, state: &StreamState) -> Result<Tensor> {
        Ok(self
            .model
            .logits_from(&state.mean_feature()?, &self.text)?
            .squeeze(0)?)
    }
}

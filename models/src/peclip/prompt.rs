//! MaPLe multimodal prompts (reference section 4).
//!
//! Learned text prompts (`ctx` `[n, Dt]` for layer 0, `compound_prompts_text.j` for the deep
//! layers) are coupled to the vision prompts by one Linear(Dt -> Dv) per depth. Every inserted
//! prompt is rounded to fp16 precision, except the layer-0 text context.

use candle_core::{DType, Tensor};

use super::adapter::shared::trainable_linear;
use super::params::Trainables;
use crate::clip::layers::Linear;
use crate::error::Result;

/// Round to the nearest fp16 value and back to f32 (the reference's `.half()`), with the
/// gradient passed straight through in f32: `x + (round(x) - x)` with the difference detached.
/// The value is `round(x)` exactly (the difference of two f32 values this close is exact, and
/// so is adding it back). Through `to_dtype` itself candle would round the gradient to fp16
/// too, by 2^-11 relative, and differently for each micro-batch of an accumulated step.
pub fn fp16_round(x: &Tensor) -> Result<Tensor> {
    let rounded = x.to_dtype(DType::F16)?.to_dtype(DType::F32)?;
    Ok((x + (rounded - x)?.detach())?)
}

/// The prompt learner of depth `J`: layer-0 context and projection, `J - 1` deep prompts and
/// projections.
#[derive(Debug, Clone)]
pub struct PromptLearner {
    pub ctx: Tensor,
    pub proj: Linear,
    pub deep_text: Vec<Tensor>,
    pub deep_proj: Vec<Linear>,
}

impl PromptLearner {
    /// Read `prompt_learner.*` for `depth`.
    pub fn new(t: &Trainables, depth: usize) -> Result<Self> {
        Ok(Self {
            ctx: t.get("prompt_learner.ctx")?,
            proj: trainable_linear(t, "prompt_learner.proj")?,
            deep_text: (0..depth - 1)
                .map(|j| t.get(&format!("prompt_learner.compound_prompts_text.{j}")))
                .collect::<Result<_>>()?,
            deep_proj: (0..depth - 1)
                .map(|j| {
                    trainable_linear(
                        t,
                        &format!("prompt_learner.compound_prompt_projections.{j}"),
                    )
                })
                .collect::<Result<_>>()?,
        })
    }

    /// Context tokens per modality.
    pub fn tokens(&self) -> Result<usize> {
        Ok(self.ctx.dim(0)?)
    }

    /// The text prompts entering each depth: `[0]` = `ctx` as is, `[j]` = fp16(deep text j-1).
    pub fn text_prompts(&self) -> Result<Vec<Tensor>> {
        let mut out = vec![self.ctx.clone()];
        for t in &self.deep_text {
            out.push(fp16_round(t)?);
        }
        Ok(out)
    }

    /// The vision prompts entering each depth: `[0]` = fp16(proj(ctx)),
    /// `[j]` = fp16(proj_{j-1}(deep text j-1)), each `[n, Dv]`.
    pub fn vision_prompts(&self) -> Result<Vec<Tensor>> {
        let mut out = vec![fp16_round(&self.proj.forward(&self.ctx)?)?];
        for (t, p) in self.deep_text.iter().zip(&self.deep_proj) {
            out.push(fp16_round(&p.forward(t)?)?);
        }
        Ok(out)
    }
}

//! The bottleneck adapter used as ShA (after attention, both encoders) and TA (after the text MLP).

use candle_core::Tensor;

use super::super::params::Trainables;
use crate::clip::layers::Linear;
use crate::error::Result;

/// `delta(y) = W_u · GELU_erf(W_d · y + b_d) + b_u`, `[.., D] -> [.., D]` through a `D/r`
/// bottleneck. The block adds it to the sub-layer output with an internal residual:
/// `x + A + delta(A)` (reference 3.1, 3.3).
#[derive(Debug, Clone)]
pub struct Adapter {
    pub down: Linear,
    pub up: Linear,
}

/// A Linear whose weight and bias are the trainables `{name}.weight` / `{name}.bias`.
pub(crate) fn trainable_linear(t: &Trainables, name: &str) -> Result<Linear> {
    Ok(Linear {
        weight: t.get(&format!("{name}.weight"))?,
        bias: Some(t.get(&format!("{name}.bias"))?),
    })
}

impl Adapter {
    /// The adapter whose tensors are `{prefix}.down_proj.*` and `{prefix}.up_proj.*`.
    pub fn new(t: &Trainables, prefix: &str) -> Result<Self> {
        Ok(Self {
            down: trainable_linear(t, &format!("{prefix}.down_proj"))?,
            up: trainable_linear(t, &format!("{prefix}.up_proj"))?,
        })
    }

    /// `delta(y)` (without the residual), computed in the trainables' f32 whatever `y`'s dtype
    /// (the result has `y`'s).
    pub fn delta(&self, y: &Tensor) -> Result<Tensor> {
        let dt = y.dtype();
        let y = y.to_dtype(self.down.weight.dtype())?;
        Ok(self
            .up
            .forward(&self.down.forward(&y)?.gelu_erf()?)?
            .to_dtype(dt)?)
    }
}

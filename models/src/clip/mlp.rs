//! CLIP's MLP: `fc2(act(fc1(x)))`.

use candle_core::Tensor;

use super::config::HiddenAct;
use super::layers::{activation, Linear};
use super::weights::Vb;
use crate::error::Result;

/// `[.., D] -> fc1 -> [.., 4D] -> act (QuickGELU in OpenAI CLIP) -> fc2 -> [.., D]`.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
    pub act: HiddenAct,
}

impl Mlp {
    /// Load `fc1` and `fc2`.
    pub fn new(dim: usize, hidden: usize, act: HiddenAct, vb: &Vb<'_>) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(dim, hidden, true, &vb.pp("fc1"))?,
            fc2: Linear::new(hidden, dim, true, &vb.pp("fc2"))?,
            act,
        })
    }

    /// Apply the MLP.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2
            .forward(&activation(self.act, &self.fc1.forward(x)?)?)
    }
}

//! Small building blocks shared by both towers: LayerNorm, Linear, activations.
//!
//! Everything here is written from differentiable primitives (candle's fused LayerNorm and
//! softmax have no backward pass), so later trainable tensors upstream receive gradients.

use candle_core::{Module, Tensor, D};

use super::config::HiddenAct;
use super::weights::Vb;
use crate::error::Result;

/// `y = (x - mean) / sqrt(var + eps) * weight + bias` over the last axis, in f32.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    /// Load `weight` and `bias` of width `dim`.
    pub fn new(dim: usize, eps: f64, vb: &Vb<'_>) -> Result<Self> {
        Ok(Self {
            weight: vb.get("weight", &[dim])?,
            bias: vb.get("bias", &[dim])?,
            eps,
        })
    }

    /// Normalise `x` over its last axis.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm_slow(
            x,
            &self.weight,
            &self.bias,
            self.eps as f32,
        )?)
    }
}

/// `y = x W^T + b` with PyTorch's `[out, in]` weight layout.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Load `weight` `[out, in]` and, if `bias`, `bias` `[out]`.
    pub fn new(in_dim: usize, out_dim: usize, bias: bool, vb: &Vb<'_>) -> Result<Self> {
        Ok(Self {
            weight: vb.get("weight", &[out_dim, in_dim])?,
            bias: if bias {
                Some(vb.get("bias", &[out_dim])?)
            } else {
                None
            },
        })
    }

    /// Apply to `[..., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let lin = candle_nn::Linear::new(self.weight.clone(), self.bias.clone());
        Ok(lin.forward(x)?)
    }
}

/// Apply CLIP's MLP activation.
pub fn activation(act: HiddenAct, x: &Tensor) -> Result<Tensor> {
    Ok(match act {
        HiddenAct::QuickGelu => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
        HiddenAct::Gelu => x.gelu_erf()?,
        HiddenAct::GeluNew => x.gelu()?,
    })
}

/// Differentiable softmax over the last axis.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::softmax(x, D::Minus1)?)
}

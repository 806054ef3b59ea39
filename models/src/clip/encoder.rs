//! A pre-LayerNorm transformer block and a stack of them (HF `CLIPEncoderLayer`).

use candle_core::Tensor;

use super::attention::Attention;
use super::config::{HiddenAct, TextConfig, VisionConfig};
use super::layers::LayerNorm;
use super::mlp::Mlp;
use super::weights::Vb;
use crate::error::Result;

/// Widths of one block.
#[derive(Debug, Clone, Copy)]
pub struct BlockDims {
    pub dim: usize,
    pub hidden: usize,
    pub heads: usize,
    pub act: HiddenAct,
    pub eps: f64,
}

macro_rules! block_dims_from {
    ($cfg:ty) => {
        impl From<&$cfg> for BlockDims {
            fn from(c: &$cfg) -> Self {
                Self {
                    dim: c.hidden_size,
                    hidden: c.intermediate_size,
                    heads: c.num_attention_heads,
                    act: c.hidden_act,
                    eps: c.layer_norm_eps,
                }
            }
        }
    };
}
block_dims_from!(TextConfig);
block_dims_from!(VisionConfig);

/// `x = x + attn(ln1(x)); x = x + mlp(ln2(x))`, `[B, L, D]` in and out.
#[derive(Debug, Clone)]
pub struct EncoderLayer {
    pub layer_norm1: LayerNorm,
    pub self_attn: Attention,
    pub layer_norm2: LayerNorm,
    pub mlp: Mlp,
}

impl EncoderLayer {
    /// Load one block (`layer_norm1`, `self_attn`, `layer_norm2`, `mlp`).
    pub fn new(d: BlockDims, vb: &Vb<'_>) -> Result<Self> {
        Ok(Self {
            layer_norm1: LayerNorm::new(d.dim, d.eps, &vb.pp("layer_norm1"))?,
            self_attn: Attention::new(d.dim, d.heads, &vb.pp("self_attn"))?,
            layer_norm2: LayerNorm::new(d.dim, d.eps, &vb.pp("layer_norm2"))?,
            mlp: Mlp::new(d.dim, d.hidden, d.act, &vb.pp("mlp"))?,
        })
    }

    /// Run the block.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let x = (x + self.attention_branch(x, mask)?)?;
        let m = self.mlp_branch(&x)?;
        Ok((x + m)?)
    }

    /// `attn(ln1(x))`: one fused op on the CPU in f32 ([`super::fused`]), candle's graph
    /// otherwise.
    pub fn attention_branch(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        match super::fused::attention(self, x, mask)? {
            Some(y) => Ok(y),
            None => self.self_attn.forward(&self.layer_norm1.forward(x)?, mask),
        }
    }

    /// `mlp(ln2(x))`, fused where [`super::fused::mlp`] applies.
    pub fn mlp_branch(&self, x: &Tensor) -> Result<Tensor> {
        match super::fused::mlp(self, x)? {
            Some(y) => Ok(y),
            None => self.mlp.forward(&self.layer_norm2.forward(x)?),
        }
    }
}

/// Load `layers.{0..n}`.
pub fn load_layers(n: usize, d: BlockDims, vb: &Vb<'_>) -> Result<Vec<EncoderLayer>> {
    (0..n)
        .map(|i| EncoderLayer::new(d, &vb.pp("layers").pp(i)))
        .collect()
}

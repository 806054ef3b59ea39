//! Multi-head self-attention of a CLIP block (HF `CLIPAttention`).

use candle_core::Tensor;

use super::layers::{softmax_last, Linear};
use super::weights::Vb;
use crate::error::Result;

/// `out_proj(softmax(q k^T / sqrt(d_h) + mask) v)` with `q, k, v` linear projections of the input.
///
/// Input and output `[B, L, D]`; the mask, if any, is additive `[L, L]` (the text tower's causal
/// mask). Attention never crosses frames: each of the `B` rows is one frame or one text.
#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub heads: usize,
}

impl Attention {
    /// Load `{q,k,v,out}_proj` of width `dim` with `heads` heads.
    pub fn new(dim: usize, heads: usize, vb: &Vb<'_>) -> Result<Self> {
        Ok(Self {
            q_proj: Linear::new(dim, dim, true, &vb.pp("q_proj"))?,
            k_proj: Linear::new(dim, dim, true, &vb.pp("k_proj"))?,
            v_proj: Linear::new(dim, dim, true, &vb.pp("v_proj"))?,
            out_proj: Linear::new(dim, dim, true, &vb.pp("out_proj"))?,
            heads,
        })
    }

    /// Self-attention over `x` `[B, L, D]`.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let hd = d / self.heads;
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, l, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split((self.q_proj.forward(x)? * (hd as f64).powf(-0.5))?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let mut att = q.matmul(&k.t()?)?;
        if let Some(m) = mask {
            att = att.broadcast_add(&m.to_dtype(att.dtype())?)?;
        }
        let y = softmax_last(&att)?.matmul(&v)?;
        let y = y.transpose(1, 2)?.reshape((b, l, d))?;
        self.out_proj.forward(&y)
    }
}

/// The additive causal mask `[len, len]`: 0 on and below the diagonal, -inf above.
pub fn causal_mask(len: usize, device: &candle_core::Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(mask, (len, len), device)?)
}

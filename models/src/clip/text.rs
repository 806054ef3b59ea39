//! The CLIP text tower (HF `CLIPTextTransformer` + `text_projection`).

use candle_core::{Device, Tensor};

use super::attention::causal_mask;
use super::config::TextConfig;
use super::encoder::{load_layers, BlockDims, EncoderLayer};
use super::layers::{LayerNorm, Linear};
use super::weights::Vb;
use crate::error::{Error, Result};

/// Token and position embeddings, causal blocks, `final_layer_norm`, the end-of-text row, and
/// `text_projection`: ids `[C, L]` to features `[C, E]`.
#[derive(Debug, Clone)]
pub struct TextTower {
    /// `[V, D]`.
    pub token_embedding: Tensor,
    /// `[L_max, D]`.
    pub position_embedding: Tensor,
    pub layers: Vec<EncoderLayer>,
    pub final_layer_norm: LayerNorm,
    pub projection: Linear,
    pub config: TextConfig,
}

impl TextTower {
    /// Load `text_model.*` and `text_projection.weight` from the root view.
    pub fn new(c: &TextConfig, projection_dim: usize, root: &Vb<'_>) -> Result<Self> {
        let vb = root.pp("text_model");
        let dims = BlockDims::from(c);
        Ok(Self {
            token_embedding: vb.get(
                "embeddings.token_embedding.weight",
                &[c.vocab_size, c.hidden_size],
            )?,
            position_embedding: vb.get(
                "embeddings.position_embedding.weight",
                &[c.max_position_embeddings, c.hidden_size],
            )?,
            layers: load_layers(c.num_hidden_layers, dims, &vb.pp("encoder"))?,
            final_layer_norm: LayerNorm::new(
                c.hidden_size,
                c.layer_norm_eps,
                &vb.pp("final_layer_norm"),
            )?,
            projection: Linear::new(
                c.hidden_size,
                projection_dim,
                false,
                &root.pp("text_projection"),
            )?,
            config: c.clone(),
        })
    }

    /// Embeddings of `ids` (`C` rows of equal length) plus positions, `[C, L, D]`.
    pub fn embed(&self, ids: &[Vec<u32>], device: &Device) -> Result<Tensor> {
        let c = ids.len();
        let l = ids.first().map_or(0, Vec::len);
        if l == 0 || l > self.config.max_position_embeddings || ids.iter().any(|r| r.len() != l) {
            return Err(Error::Config(format!(
                "token rows must share one length between 1 and {}",
                self.config.max_position_embeddings
            )));
        }
        if let Some(&bad) = ids
            .iter()
            .flatten()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(Error::Config(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let idx = Tensor::from_vec(flat, c * l, device)?;
        let tok =
            self.token_embedding
                .index_select(&idx, 0)?
                .reshape((c, l, self.config.hidden_size))?;
        Ok(tok.broadcast_add(&self.position_embedding.narrow(0, 0, l)?)?)
    }

    /// Run the blocks on embedded tokens `[C, L, D]` and pool the row `eot[c]` of each text:
    /// projected features `[C, E]`.
    pub fn forward_embedded(&self, x: &Tensor, eot: &[usize]) -> Result<Tensor> {
        let l = x.dim(1)?;
        let mask = causal_mask(l, x.device())?;
        let mut x = x.clone();
        for layer in &self.layers {
            x = layer.forward(&x, Some(&mask))?;
        }
        self.pool(&x, eot)
    }

    /// `final_layer_norm`, the row `eot[c]` of each text, and `text_projection`: `[C, L, D]` to
    /// `[C, E]`.
    pub fn pool(&self, x: &Tensor, eot: &[usize]) -> Result<Tensor> {
        let (c, l, d) = x.dims3()?;
        let x = self.final_layer_norm.forward(x)?;
        let rows: Vec<u32> = eot
            .iter()
            .enumerate()
            .map(|(i, &e)| (i * l + e) as u32)
            .collect();
        let rows = Tensor::from_vec(rows, c, x.device())?;
        let pooled = x.reshape((c * l, d))?.index_select(&rows, 0)?;
        Ok(self
            .projection
            .forward(&pooled)?
            .to_dtype(candle_core::DType::F32)?)
    }

    /// Projected features `[C, E]` of token rows, pooled at the first end-of-text token (the
    /// largest id, as HF's `argmax` pooling).
    pub fn forward(&self, ids: &[Vec<u32>], device: &Device) -> Result<Tensor> {
        let eot: Vec<usize> = ids
            .iter()
            .map(|r| {
                let max = r.iter().copied().max().unwrap_or(0);
                r.iter().position(|&t| t == max).unwrap_or(0)
            })
            .collect();
        self.forward_embedded(&self.embed(ids, device)?, &eot)
    }
}

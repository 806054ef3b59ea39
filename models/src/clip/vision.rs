//! The CLIP vision tower (HF `CLIPVisionTransformer` + `visual_projection`).

use candle_core::Tensor;

use super::config::VisionConfig;
use super::encoder::{load_layers, BlockDims, EncoderLayer};
use super::layers::{LayerNorm, Linear};
use super::weights::Vb;
use crate::error::Result;

/// Patch embedding, class token and positions: `[N, 3, H, W] -> [N, 1 + G², D]`.
///
/// The 16×16 stride-16 convolution (no bias) is computed as a reshape and one matmul, which is
/// the same arithmetic.
#[derive(Debug, Clone)]
pub struct VisionEmbeddings {
    /// `[D, 3 * P * P]` (the conv kernel flattened channel-major).
    pub patch_weight: Tensor,
    /// `[D]`.
    pub class_embedding: Tensor,
    /// `[1 + G², D]`.
    pub position_embedding: Tensor,
    pub patch_size: usize,
    pub grid: usize,
}

impl VisionEmbeddings {
    /// Load from `vision_model.embeddings`.
    pub fn new(c: &VisionConfig, vb: &Vb<'_>) -> Result<Self> {
        let (d, p, ch) = (c.hidden_size, c.patch_size, c.num_channels);
        let w = vb.get("patch_embedding.weight", &[d, ch, p, p])?;
        Ok(Self {
            patch_weight: w.reshape((d, ch * p * p))?,
            class_embedding: vb.get("class_embedding", &[d])?,
            position_embedding: vb.get("position_embedding.weight", &[c.num_patches() + 1, d])?,
            patch_size: p,
            grid: c.grid(),
        })
    }

    /// Patch tokens only, `[N, G², D]`.
    pub fn patches(&self, pixels: &Tensor) -> Result<Tensor> {
        let (n, ch, _, _) = pixels.dims4()?;
        let (g, p) = (self.grid, self.patch_size);
        let x = pixels
            .to_dtype(self.patch_weight.dtype())?
            .reshape((n, ch, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((n, g * g, ch * p * p))?;
        Ok(x.broadcast_matmul(&self.patch_weight.t()?)?)
    }

    /// `[class; patches] + positions`, `[N, 1 + G², D]`.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let patches = self.patches(pixels)?;
        let (n, _, d) = patches.dims3()?;
        let cls = self.class_embedding.reshape((1, 1, d))?.repeat((n, 1, 1))?;
        let x = Tensor::cat(&[&cls, &patches], 1)?;
        Ok(x.broadcast_add(&self.position_embedding)?)
    }
}

/// The vision tower: embeddings, `pre_layrnorm`, the blocks, `post_layernorm` on the class token
/// and `visual_projection`. Pixels `[N, 3, S, S]` (already normalised) to features `[N, E]`.
#[derive(Debug, Clone)]
pub struct VisionTower {
    pub embeddings: VisionEmbeddings,
    pub pre_layrnorm: LayerNorm,
    pub layers: Vec<EncoderLayer>,
    pub post_layernorm: LayerNorm,
    pub projection: Linear,
    pub config: VisionConfig,
}

impl VisionTower {
    /// Load `vision_model.*` and `visual_projection.weight` from the root view.
    pub fn new(c: &VisionConfig, projection_dim: usize, root: &Vb<'_>) -> Result<Self> {
        let vb = root.pp("vision_model");
        let dims = BlockDims::from(c);
        Ok(Self {
            embeddings: VisionEmbeddings::new(c, &vb.pp("embeddings"))?,
            pre_layrnorm: LayerNorm::new(c.hidden_size, c.layer_norm_eps, &vb.pp("pre_layrnorm"))?,
            layers: load_layers(c.num_hidden_layers, dims, &vb.pp("encoder"))?,
            post_layernorm: LayerNorm::new(
                c.hidden_size,
                c.layer_norm_eps,
                &vb.pp("post_layernorm"),
            )?,
            projection: Linear::new(
                c.hidden_size,
                projection_dim,
                false,
                &root.pp("visual_projection"),
            )?,
            config: c.clone(),
        })
    }

    /// Projected class-token features `[N, E]` of `pixels` `[N, 3, S, S]`.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let mut x = self
            .pre_layrnorm
            .forward(&self.embeddings.forward(pixels)?)?;
        for layer in &self.layers {
            x = layer.forward(&x, None)?;
        }
        self.pool(&x)
    }

    /// `post_layernorm` of the class token and `visual_projection`: `[N, L, D]` to `[N, E]`,
    /// f32 whatever the backbone's dtype.
    pub fn pool(&self, x: &Tensor) -> Result<Tensor> {
        let cls = x.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(self
            .projection
            .forward(&self.post_layernorm.forward(&cls)?)?
            .to_dtype(candle_core::DType::F32)?)
    }
}

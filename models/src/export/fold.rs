//! Fold a trained PE-CLIP into plain f32 arrays for the per-frame step model (reference sections
//! 3 and 10). Every rewrite here is exact in real arithmetic:
//!
//! - the text branch becomes the 7 normalised class features (a constant);
//! - the vision prompts of every depth become constant rows (fp16-rounded as the reference does);
//! - pixel scaling (`/255` and the package's normalisation) folds into the patch embedding, and the
//!   class row `ln_pre(class + pos_0)` and the layer-0 prompt rows `ln_pre(P_0)` are precomputed;
//! - `q`, `k`, `v` stack into one layer with the `1/√d_h` attention scale folded into `q`;
//! - the ShA down-projection fuses with the attention output projection
//!   (`[W_o; W_d W_o]`, one matmul);
//! - the TDA scale and down-projection stack into one layer (`[w_s; W_d]`);
//! - LayerNorm affines are kept here as [`Norm`]s and fold into the layer after them when the
//!   graph is built (`export::graph`), where int8 equalization may rescale them;
//! - `ln_post` and the projection act on the class row only, and the last block computes its
//!   attention query, MLP and TDA for that row alone.

use candle_core::Tensor;

use pe_clip_calibrate::fold::Linear;

use crate::clip::config::HiddenAct;
use crate::clip::encoder::EncoderLayer;
use crate::clip::layers::{LayerNorm, Linear as CandleLinear};
use crate::error::{Error, Result};
use crate::peclip::adapter::TemporalAdapter;
use crate::peclip::config::{ScaleAt, TemporalCell};
use crate::peclip::model::VisionAdapters;
use crate::peclip::PeClip;
use crate::preprocess::{PixelNorm, CLIP_MEAN, CLIP_STD};
use crate::zero_shot::l2_normalize;

/// A LayerNorm's affine `γ`, `β` and epsilon.
#[derive(Debug, Clone, PartialEq)]
pub struct Norm {
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
    pub eps: f32,
}

/// The recurrent TDA of one block, folded.
#[derive(Debug, Clone, PartialEq)]
pub struct FoldedTda {
    /// The TDA's own LayerNorm (its affine folds into `scale_down`).
    pub ln: Norm,
    /// `[w_s; W_d]`: row 0 is the dynamic scale, rows `1..=H` the down-projection.
    pub scale_down: Linear,
    pub cell: TemporalCell,
    pub scale_at: ScaleAt,
    /// `W_ih` `[G·H, H]` with `b_ih` (PyTorch gate order).
    pub w_ih: Linear,
    /// `W_hh` `[G·H, H]` with `b_hh`.
    pub w_hh: Linear,
    pub up: Linear,
    pub hidden: usize,
}

/// The TDA of one block: recurrent, or a plain bottleneck adapter (no cell).
#[derive(Debug, Clone, PartialEq)]
pub enum FoldedTemporal {
    Recurrent(FoldedTda),
    Plain { down: Linear, up: Linear },
}

/// One vision block, folded.
#[derive(Debug, Clone, PartialEq)]
pub struct FoldedBlock {
    /// Prompt rows `[n, D]` that replace the last `n` rows of the input (blocks `1..depth`).
    pub prompts: Option<Vec<f32>>,
    pub ln1: Norm,
    /// `[q·d_h^-½; k; v]`, `[3D, D]`.
    pub qkv: Linear,
    pub heads: usize,
    /// `[W_o; W_d^S W_o]` (`[D + r, D]`), or `W_o` alone without ShA.
    pub attn_out: Linear,
    /// ShA up-projection `[D, r]`.
    pub sha_up: Option<Linear>,
    pub ln2: Norm,
    pub fc1: Linear,
    pub fc2: Linear,
    pub act: HiddenAct,
    pub temporal: Option<FoldedTemporal>,
    /// Rows this block outputs (and keeps state for): all, all but the prompt rows the next
    /// block overwrites, or the class row alone in the last block (reference section 10).
    pub rows_out: usize,
}

/// The whole per-frame vision path plus the constants of the video head.
#[derive(Debug, Clone, PartialEq)]
pub struct FoldedModel {
    pub image_size: usize,
    pub patch_size: usize,
    pub width: usize,
    /// Patch embedding on raw `u8` values (channel-last patches `[kh, kw, c]` flattened), pixel
    /// scaling folded in; `[D, P·P·3]`.
    pub patch: Linear,
    /// Per patch row: the folded pixel-normalisation bias plus the position embedding, `[G², D]`.
    pub patch_bias: Vec<f32>,
    pub ln_pre: Norm,
    /// `ln_pre(class + pos_0)`, `[D]`.
    pub cls_row: Vec<f32>,
    /// `ln_pre(fp16(P_v^0))`, `[n, D]` (with prompts).
    pub prompt0_rows: Option<Vec<f32>>,
    pub blocks: Vec<FoldedBlock>,
    pub ln_post: Norm,
    /// `visual_projection` `[E, D]` (zero bias).
    pub proj: Linear,
    /// L2-normalised class features `[C, E]`.
    pub text_features: Vec<f32>,
    pub classes: usize,
    pub logit_scale: f32,
    pub pixel_norm: PixelNorm,
}

fn vec1(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

fn linear(l: &CandleLinear) -> Result<Linear> {
    let (out_dim, in_dim) = l.weight.dims2()?;
    let b = match &l.bias {
        Some(b) => vec1(b)?,
        None => vec![0.0; out_dim],
    };
    Ok(Linear::new(vec1(&l.weight)?, b, out_dim, in_dim))
}

fn norm(n: &LayerNorm) -> Result<Norm> {
    Ok(Norm {
        gamma: vec1(&n.weight)?,
        beta: vec1(&n.bias)?,
        eps: n.eps as f32,
    })
}

impl Norm {
    /// Apply to each row of `x` (`[rows, D]`), computing in f64.
    pub fn apply_rows(&self, x: &[f32]) -> Vec<f32> {
        let d = self.gamma.len();
        x.chunks_exact(d)
            .flat_map(|row| {
                let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / d as f64;
                let var = row
                    .iter()
                    .map(|&v| (f64::from(v) - mean).powi(2))
                    .sum::<f64>()
                    / d as f64;
                let inv = 1.0 / (var + f64::from(self.eps)).sqrt();
                row.iter()
                    .zip(&self.gamma)
                    .zip(&self.beta)
                    .map(move |((&v, &g), &b)| ((f64::from(v) - mean) * inv) as f32 * g + b)
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// Scale rows `from..to` of a linear layer (weights and bias) by `k`.
fn scale_rows(l: &mut Linear, from: usize, to: usize, k: f32) {
    let i = l.in_dim;
    for r in from..to {
        for v in &mut l.w[r * i..(r + 1) * i] {
            *v *= k;
        }
        l.b[r] *= k;
    }
}

impl FoldedModel {
    /// Fold `model` for per-frame inference on `u8` frames normalised by `pixel_norm`.
    pub fn from_model(model: &PeClip, pixel_norm: PixelNorm) -> Result<Self> {
        let vision = &model.clip.vision;
        let vc = &model.clip.config.vision_config;
        let (d, p, g) = (vc.hidden_size, vc.patch_size, vc.grid());
        if vc.num_channels != 3 {
            return Err(Error::Config(format!(
                "export needs a 3-channel vision tower, this one has {}",
                vc.num_channels
            )));
        }
        let w = vec1(&vision.embeddings.patch_weight)?;
        let (patch, pb) = fold_patch_embedding(&w, d, p, pixel_norm);
        let pos = vec1(&vision.embeddings.position_embedding)?; // [1 + G², D]
        let patch_bias: Vec<f32> = (0..g * g)
            .flat_map(|r| {
                let pos = &pos;
                let pb = &pb;
                (0..d).map(move |j| (pb[j] + f64::from(pos[(1 + r) * d + j])) as f32)
            })
            .collect();
        let ln_pre = norm(&vision.pre_layrnorm)?;
        let class = vec1(&vision.embeddings.class_embedding)?;
        let cls_in: Vec<f32> = class.iter().zip(&pos[..d]).map(|(a, b)| a + b).collect();
        let cls_row = ln_pre.apply_rows(&cls_in);
        let vprompts = model.vision_prompts()?;
        let n_ctx = vprompts.first().map_or(Ok(0), |t| t.dim(0))?;
        let prompt0_rows = match vprompts.first() {
            Some(p0) => Some(ln_pre.apply_rows(&vec1(p0)?)),
            None => None,
        };
        let rows_all = 1 + g * g + n_ctx;
        let layers = vision.layers.len();
        let depth = vprompts.len();
        let mut blocks = Vec::with_capacity(layers);
        for (i, (layer, ad)) in vision.layers.iter().zip(&model.vision_adapters).enumerate() {
            let rows_out = if i + 1 == layers {
                1
            } else if i + 1 < depth {
                rows_all - n_ctx
            } else {
                rows_all
            };
            let prompts = if i >= 1 && i < depth {
                Some(vec1(&vprompts[i])?)
            } else {
                None
            };
            blocks.push(fold_block(layer, ad, d, prompts, rows_out)?);
        }
        let text = l2_normalize(&model.text_features()?)?;
        let (classes, _) = text.dims2()?;
        Ok(Self {
            image_size: vc.image_size,
            patch_size: p,
            width: d,
            patch,
            patch_bias,
            ln_pre,
            cls_row,
            prompt0_rows,
            blocks,
            ln_post: norm(&vision.post_layernorm)?,
            proj: linear(&vision.projection)?,
            text_features: vec1(&text)?,
            classes,
            logit_scale: model.config.logit_scale,
            pixel_norm,
        })
    }

    /// Token rows entering block 0 (class, patches, prompt rows).
    pub fn rows(&self) -> usize {
        let g = self.image_size / self.patch_size;
        1 + g * g + self.prompt_rows()
    }

    /// Prompt rows per frame (0 without prompts).
    pub fn prompt_rows(&self) -> usize {
        self.prompt0_rows
            .as_ref()
            .map_or(0, |p| p.len() / self.width)
    }

    /// Projected feature width.
    pub fn feature_dim(&self) -> usize {
        self.proj.out_dim
    }

    /// The recurrent state each block carries: `(block, rows, width)` (an LSTM carries `h` and
    /// `c` side by side, width `2H`).
    pub fn state_layout(&self) -> Vec<(usize, usize, usize)> {
        self.blocks
            .iter()
            .enumerate()
            .filter_map(|(i, b)| match &b.temporal {
                Some(FoldedTemporal::Recurrent(t)) => {
                    let w = if t.cell == TemporalCell::Lstm {
                        2 * t.hidden
                    } else {
                        t.hidden
                    };
                    Some((i, b.rows_out, w))
                }
                _ => None,
            })
            .collect()
    }

    /// MatMuls per block of the unfolded model (q, k, v, out, the two attention products, fc1,
    /// fc2, ShA down and up, TDA scale, down, cell input and hidden, up), for the export report.
    pub fn unfolded_matmuls(&self, block: usize) -> usize {
        let b = &self.blocks[block];
        let sha = if b.sha_up.is_some() { 2 } else { 0 };
        let tda = match &b.temporal {
            Some(FoldedTemporal::Recurrent(_)) => 5,
            Some(FoldedTemporal::Plain { .. }) => 2,
            None => 0,
        };
        8 + sha + tda
    }
}

/// The patch embedding on u8 channel-last patches with the pixel normalisation folded in:
/// `W'[o, (kh, kw, c)] = W[o, (c, kh, kw)] / (255 std_c)`, and the bias `-Σ W mean_c / std_c`
/// (f64, to be added to the positions).
fn fold_patch_embedding(
    w: &[f32],
    d: usize,
    p: usize,
    pixel_norm: PixelNorm,
) -> (Linear, Vec<f64>) {
    let (mean, std) = match pixel_norm {
        PixelNorm::Clip => (CLIP_MEAN, CLIP_STD),
        PixelNorm::None => ([0.0; 3], [1.0; 3]),
    };
    let k = 3 * p * p;
    let mut pw = vec![0f32; d * k];
    let mut pb = vec![0f64; d];
    for o in 0..d {
        for c in 0..3 {
            for kh in 0..p {
                for kw in 0..p {
                    let v = w[o * k + c * p * p + kh * p + kw];
                    pw[o * k + (kh * p + kw) * 3 + c] = v / (255.0 * std[c]);
                    pb[o] -= f64::from(v) * f64::from(mean[c] / std[c]);
                }
            }
        }
    }
    (Linear::new(pw, vec![0.0; d], d, k), pb)
}

/// One vision block: q pre-scaled by `1/√head_dim` and stacked with k and v, the Shared
/// Adapter's down-projection fused into the attention output, and its TDA.
fn fold_block(
    layer: &EncoderLayer,
    ad: &VisionAdapters,
    d: usize,
    prompts: Option<Vec<f32>>,
    rows_out: usize,
) -> Result<FoldedBlock> {
    let att = &layer.self_attn;
    let hd = d / att.heads;
    let mut q = linear(&att.q_proj)?;
    scale_rows(&mut q, 0, d, (hd as f32).powf(-0.5));
    let qkv = Linear::stack(&[&q, &linear(&att.k_proj)?, &linear(&att.v_proj)?]);
    let out = linear(&att.out_proj)?;
    let (attn_out, sha_up) = match &ad.shared {
        Some(s) => (
            Linear::stack(&[&out, &out.then(&linear(&s.down)?)]),
            Some(linear(&s.up)?),
        ),
        None => (out, None),
    };
    Ok(FoldedBlock {
        prompts,
        ln1: norm(&layer.layer_norm1)?,
        qkv,
        heads: att.heads,
        attn_out,
        sha_up,
        ln2: norm(&layer.layer_norm2)?,
        fc1: linear(&layer.mlp.fc1)?,
        fc2: linear(&layer.mlp.fc2)?,
        act: layer.mlp.act,
        temporal: fold_temporal(ad.temporal.as_ref())?,
        rows_out,
    })
}

/// A block's TDA: the dynamic scale stacked over the down-projection, the cell's weights as
/// linear layers.
fn fold_temporal(t: Option<&TemporalAdapter>) -> Result<Option<FoldedTemporal>> {
    Ok(match t {
        None => None,
        Some(TemporalAdapter::Plain(a)) => Some(FoldedTemporal::Plain {
            down: linear(&a.down)?,
            up: linear(&a.up)?,
        }),
        Some(TemporalAdapter::Recurrent {
            ln,
            scale,
            down,
            up,
            cell,
            weights,
            scale_at,
        }) => {
            let (gh, hidden) = weights.w_ih.dims2()?;
            let cell_linear = |w: &Tensor, b: &Tensor| -> Result<Linear> {
                Ok(Linear::new(vec1(w)?, vec1(b)?, gh, hidden))
            };
            Some(FoldedTemporal::Recurrent(FoldedTda {
                ln: norm(ln)?,
                scale_down: Linear::stack(&[&linear(scale)?, &linear(down)?]),
                cell: *cell,
                scale_at: *scale_at,
                w_ih: cell_linear(&weights.w_ih, &weights.b_ih)?,
                w_hh: cell_linear(&weights.w_hh, &weights.b_hh)?,
                up: linear(up)?,
                hidden,
            }))
        }
    })
}

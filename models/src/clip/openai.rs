//! The original OpenAI CLIP state-dict layout (`visual.transformer.resblocks.N.attn.in_proj_weight`
//! and friends), which the PE-CLIP authors' checkpoints carry. Sizes are inferred from the tensor
//! shapes as OpenAI's `build_model` does; head counts cannot be seen in shapes and default to
//! width / 64 unless given.

use super::attention::Attention;
use super::config::{ClipConfig, HiddenAct, TextConfig, VisionConfig};
use super::encoder::EncoderLayer;
use super::layers::{LayerNorm, Linear};
use super::mlp::Mlp;
use super::text::TextTower;
use super::vision::{VisionEmbeddings, VisionTower};
use super::weights::{Vb, Weights};
use super::ClipModel;
use crate::error::{Error, Result};

/// The key that identifies an OpenAI-layout checkpoint.
pub const OPENAI_MARKER: &str = "visual.conv1.weight";

/// Head counts to use where the checkpoint cannot tell them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeadOverrides {
    /// Vision heads (default: width / 64).
    pub vision: Option<usize>,
    /// Text heads (default: width / 64).
    pub text: Option<usize>,
}

/// The key prefix under which an OpenAI-layout backbone sits in `weights` (for example `""`,
/// `"clip_model."` or `"module.clip_model."`), if any.
pub fn find_openai_prefix(weights: &Weights) -> Option<String> {
    let mut prefixes: Vec<String> = weights
        .keys()
        .filter_map(|k| k.strip_suffix(OPENAI_MARKER).map(str::to_string))
        .filter(|p| p.is_empty() || p.ends_with('.'))
        .collect();
    prefixes.sort_by_key(String::len);
    prefixes.into_iter().next()
}

fn shape(weights: &Weights, key: &str) -> Result<Vec<usize>> {
    weights
        .shape_of(key)
        .map(<[usize]>::to_vec)
        .ok_or_else(|| Error::MissingTensor {
            path: weights.path().to_path_buf(),
            key: key.to_string(),
        })
}

fn count_blocks(weights: &Weights, prefix: &str) -> usize {
    (0..)
        .take_while(|i| weights.contains(&format!("{prefix}{i}.attn.in_proj_weight")))
        .count()
}

fn heads_for(width: usize, given: Option<usize>, what: &str) -> Result<usize> {
    let heads = given.unwrap_or(width / 64);
    if heads == 0 || width % heads != 0 {
        return Err(Error::Config(format!(
            "{what} width {width} cannot be split into {heads} heads (pass the head count, e.g. --{what}-heads)"
        )));
    }
    Ok(heads)
}

/// Infer the configuration of an OpenAI-layout backbone under `prefix`.
pub fn infer_config(weights: &Weights, prefix: &str, heads: HeadOverrides) -> Result<ClipConfig> {
    let k = |name: &str| format!("{prefix}{name}");
    let conv = shape(weights, &k("visual.conv1.weight"))?;
    let vpos = shape(weights, &k("visual.positional_embedding"))?;
    if conv.len() != 4 || vpos.len() != 2 || vpos[0] < 2 {
        return Err(Error::invalid(
            weights.path(),
            format!("unexpected visual.conv1.weight {conv:?} / positional_embedding {vpos:?}"),
        ));
    }
    let grid = ((vpos[0] - 1) as f64).sqrt().round() as usize;
    if grid * grid + 1 != vpos[0] {
        return Err(Error::invalid(
            weights.path(),
            format!(
                "visual.positional_embedding has {} rows, not 1 + a square",
                vpos[0]
            ),
        ));
    }
    let vision_width = conv[0];
    let vision_layers = count_blocks(weights, &k("visual.transformer.resblocks."));
    let vision_hidden = shape(
        weights,
        &k("visual.transformer.resblocks.0.mlp.c_fc.weight"),
    )?[0];
    let text_width = shape(weights, &k("ln_final.weight"))?[0];
    let text_layers = count_blocks(weights, &k("transformer.resblocks."));
    let text_hidden = shape(weights, &k("transformer.resblocks.0.mlp.c_fc.weight"))?[0];
    let tproj = shape(weights, &k("text_projection"))?;
    let tpos = shape(weights, &k("positional_embedding"))?;
    let vocab = shape(weights, &k("token_embedding.weight"))?[0];
    let cfg = ClipConfig {
        text_config: TextConfig {
            hidden_size: text_width,
            intermediate_size: text_hidden,
            num_attention_heads: heads_for(text_width, heads.text, "text")?,
            num_hidden_layers: text_layers,
            max_position_embeddings: tpos[0],
            vocab_size: vocab,
            hidden_act: HiddenAct::QuickGelu,
            layer_norm_eps: 1e-5,
        },
        vision_config: VisionConfig {
            hidden_size: vision_width,
            intermediate_size: vision_hidden,
            num_attention_heads: heads_for(vision_width, heads.vision, "vision")?,
            num_hidden_layers: vision_layers,
            image_size: conv[3] * grid,
            patch_size: conv[3],
            num_channels: conv[1],
            hidden_act: HiddenAct::QuickGelu,
            layer_norm_eps: 1e-5,
        },
        projection_dim: tproj.get(1).copied().unwrap_or(0),
        logit_scale_init_value: 2.6592,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// One OpenAI residual block (`ln_1`, `attn.in_proj_*`, `attn.out_proj`, `ln_2`, `mlp.c_fc`,
/// `mlp.c_proj`) as an [`EncoderLayer`]; the packed q/k/v projection is split in three.
fn load_block(
    d: usize,
    hidden: usize,
    heads: usize,
    act: HiddenAct,
    eps: f64,
    vb: &Vb<'_>,
) -> Result<EncoderLayer> {
    let w = vb.get("attn.in_proj_weight", &[3 * d, d])?;
    let b = vb.get("attn.in_proj_bias", &[3 * d])?;
    let part = |i: usize| -> Result<Linear> {
        Ok(Linear {
            weight: w.narrow(0, i * d, d)?.contiguous()?,
            bias: Some(b.narrow(0, i * d, d)?.contiguous()?),
        })
    };
    Ok(EncoderLayer {
        layer_norm1: LayerNorm::new(d, eps, &vb.pp("ln_1"))?,
        self_attn: Attention {
            q_proj: part(0)?,
            k_proj: part(1)?,
            v_proj: part(2)?,
            out_proj: Linear::new(d, d, true, &vb.pp("attn.out_proj"))?,
            heads,
        },
        layer_norm2: LayerNorm::new(d, eps, &vb.pp("ln_2"))?,
        mlp: Mlp {
            fc1: Linear::new(d, hidden, true, &vb.pp("mlp.c_fc"))?,
            fc2: Linear::new(hidden, d, true, &vb.pp("mlp.c_proj"))?,
            act,
        },
    })
}

/// Build a [`ClipModel`] from an OpenAI-layout backbone under `prefix` (with its trailing dot).
pub fn load_openai(weights: &Weights, prefix: &str, cfg: ClipConfig) -> Result<ClipModel> {
    let root = Vb::root(weights);
    let root = if prefix.is_empty() {
        root
    } else {
        root.pp(prefix.trim_end_matches('.'))
    };
    let v = &cfg.vision_config;
    let t = &cfg.text_config;
    let e = cfg.projection_dim;
    let vis = root.pp("visual");
    let (d, p) = (v.hidden_size, v.patch_size);
    let vision = VisionTower {
        embeddings: VisionEmbeddings {
            patch_weight: vis
                .get("conv1.weight", &[d, v.num_channels, p, p])?
                .reshape((d, v.num_channels * p * p))?,
            class_embedding: vis.get("class_embedding", &[d])?,
            position_embedding: vis.get("positional_embedding", &[v.num_patches() + 1, d])?,
            patch_size: p,
            grid: v.grid(),
        },
        pre_layrnorm: LayerNorm::new(d, v.layer_norm_eps, &vis.pp("ln_pre"))?,
        layers: (0..v.num_hidden_layers)
            .map(|i| {
                load_block(
                    d,
                    v.intermediate_size,
                    v.num_attention_heads,
                    v.hidden_act,
                    v.layer_norm_eps,
                    &vis.pp("transformer.resblocks").pp(i),
                )
            })
            .collect::<Result<_>>()?,
        post_layernorm: LayerNorm::new(d, v.layer_norm_eps, &vis.pp("ln_post"))?,
        projection: Linear {
            weight: vis.get("proj", &[d, e])?.t()?.contiguous()?,
            bias: None,
        },
        config: v.clone(),
    };
    let dt = t.hidden_size;
    let text = TextTower {
        token_embedding: root.get("token_embedding.weight", &[t.vocab_size, dt])?,
        position_embedding: root.get("positional_embedding", &[t.max_position_embeddings, dt])?,
        layers: (0..t.num_hidden_layers)
            .map(|i| {
                load_block(
                    dt,
                    t.intermediate_size,
                    t.num_attention_heads,
                    t.hidden_act,
                    t.layer_norm_eps,
                    &root.pp("transformer.resblocks").pp(i),
                )
            })
            .collect::<Result<_>>()?,
        final_layer_norm: LayerNorm::new(dt, t.layer_norm_eps, &root.pp("ln_final"))?,
        projection: Linear {
            weight: root.get("text_projection", &[dt, e])?.t()?.contiguous()?,
            bias: None,
        },
        config: t.clone(),
    };
    let key = root.key("logit_scale");
    let logit_scale = if weights.contains(&key) {
        super::read_scalar(weights, &key)?
    } else {
        cfg.logit_scale_init_value as f32
    };
    Ok(ClipModel {
        config: cfg,
        vision,
        text,
        logit_scale,
        device: weights.device().clone(),
    })
}

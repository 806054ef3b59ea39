//! Import a checkpoint in the PE-CLIP authors' layout (backbone in OpenAI CLIP naming, adapters
//! inside its blocks, `prompt_learner.*`), with or without DataParallel's `module.` prefix and the
//! `image_encoder.` / `text_encoder.` aliases. Every size is inferred from the tensor shapes.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Device;

use super::checkpoint::{
    created_by, save_run, BackboneRef, RunConfig, BACKBONE_FILE, RUN_FORMAT_VERSION,
};
use super::config::{AdapterSwitches, PeClipConfig, PromptConfig, TemporalCell};
use super::params::{trainable_specs, Trainables};
use crate::classes::ClassSet;
use crate::clip::openai::{find_openai_prefix, infer_config, HeadOverrides, OPENAI_MARKER};
use crate::clip::{ClipConfig, Weights};
use crate::error::{Error, Result};
use crate::preprocess::{PixelNorm, PreprocessSpec};

/// What an import found.
#[derive(Debug, Clone)]
pub struct Imported {
    pub config: RunConfig,
    /// Key prefix of the backbone in the source (e.g. `module.clip_model.`).
    pub backbone_prefix: String,
    /// Number of trainable values imported.
    pub trainable_values: usize,
}

/// Infer the PE-CLIP configuration of a reference checkpoint from its shapes.
pub fn infer_peclip_config(
    weights: &Weights,
    backbone_prefix: &str,
    prompt_prefix: Option<&str>,
    clip: &ClipConfig,
) -> Result<PeClipConfig> {
    let v0 = format!("{backbone_prefix}visual.transformer.resblocks.0.");
    let t0 = format!("{backbone_prefix}transformer.resblocks.0.");
    let has = |k: &str| weights.contains(k);
    let adapters = AdapterSwitches {
        vision_shared: has(&format!("{v0}adapter_pre_attn.down_proj.weight")),
        temporal: has(&format!("{v0}adapter_pre_mlp.down_proj.weight")),
        text_shared: has(&format!("{t0}adapter_pre_attn.down_proj.weight")),
        text: has(&format!("{t0}adapter_pre_mlp.down_proj.weight")),
    };
    let reduction = infer_reduction(weights, &v0, &t0, clip)?;
    let temporal_cell = if adapters.temporal {
        infer_cell(weights, &v0)?
    } else {
        TemporalCell::Gru
    };
    let prompts = match prompt_prefix {
        Some(p) => infer_prompts(weights, p),
        None => PromptConfig {
            enabled: false,
            ..PromptConfig::default()
        },
    };
    let cfg = PeClipConfig {
        reduction: reduction.unwrap_or(8),
        prompts,
        adapters,
        temporal_cell,
        ..PeClipConfig::default()
    };
    cfg.validate(clip)
        .map_err(|e| Error::invalid(weights.path(), e.to_string()))?;
    Ok(cfg)
}

/// The adapters' reduction factor (width / bottleneck), which all adapters present must share;
/// `None` without adapters. `v0`, `t0`: the key prefixes of the first vision and text blocks.
fn infer_reduction(
    weights: &Weights,
    v0: &str,
    t0: &str,
    clip: &ClipConfig,
) -> Result<Option<usize>> {
    let (dv, dt) = (clip.vision_config.hidden_size, clip.text_config.hidden_size);
    let down_keys = [
        (format!("{v0}adapter_pre_attn.down_proj.weight"), dv),
        (format!("{v0}adapter_pre_mlp.down_proj.weight"), dv),
        (format!("{t0}adapter_pre_attn.down_proj.weight"), dt),
        (format!("{t0}adapter_pre_mlp.down_proj.weight"), dt),
    ];
    let mut reduction = None;
    for (key, width) in &down_keys {
        if let Some(s) = weights.shape_of(key) {
            let b = s[0].max(1);
            let r = width / b;
            match reduction {
                None => reduction = Some(r),
                Some(prev) if prev != r => {
                    return Err(Error::invalid(
                        weights.path(),
                        format!(
                            "adapters disagree on the reduction factor ({prev} vs {r} at {key})"
                        ),
                    ))
                }
                _ => {}
            }
        }
    }
    Ok(reduction)
}

/// The TDA's recurrent cell from its gate count (`W_ih` rows over the bottleneck); no cell
/// weights: a plain bottleneck.
fn infer_cell(weights: &Weights, v0: &str) -> Result<TemporalCell> {
    let Some(s) = weights.shape_of(&format!("{v0}adapter_pre_mlp.rnn.weight_ih_l0")) else {
        return Ok(TemporalCell::None);
    };
    let b = weights
        .shape_of(&format!("{v0}adapter_pre_mlp.down_proj.weight"))
        .map_or(1, |d| d[0].max(1));
    match s[0] / b {
        3 => Ok(TemporalCell::Gru),
        4 => Ok(TemporalCell::Lstm),
        1 => Ok(TemporalCell::Rnn),
        g => Err(Error::invalid(
            weights.path(),
            format!("temporal cell with {g} gates is not known"),
        )),
    }
}

/// MaPLe's prompt depth and context length from the prompt learner's keys under `p`.
fn infer_prompts(weights: &Weights, p: &str) -> PromptConfig {
    let ctx = weights
        .shape_of(&format!("{p}prompt_learner.ctx"))
        .map(<[usize]>::to_vec)
        .unwrap_or_default();
    let deep = (0..)
        .take_while(|j| weights.contains(&format!("{p}prompt_learner.compound_prompts_text.{j}")))
        .count();
    PromptConfig {
        enabled: true,
        depth: deep + 1,
        tokens: ctx.first().copied().unwrap_or(0),
    }
}

/// Convert a reference checkpoint (safetensors) into a run directory `out` holding its backbone
/// (`backbone.safetensors`, OpenAI layout), its trainables and `peclip.json`.
pub fn import_reference(source: &Path, out: &Path, heads: HeadOverrides) -> Result<Imported> {
    let weights = Weights::open(source, &Device::Cpu)?;
    let backbone_prefix = find_openai_prefix(&weights).ok_or_else(|| {
        Error::invalid(
            source,
            format!("not a PE-CLIP/CLIP checkpoint in the OpenAI layout (no `{OPENAI_MARKER}`)"),
        )
    })?;
    let prompt_prefix: Option<String> = weights
        .keys()
        .filter_map(|k| k.strip_suffix("prompt_learner.ctx").map(str::to_string))
        .min_by_key(String::len);
    let clip = infer_config(&weights, &backbone_prefix, heads)?;
    let peclip = infer_peclip_config(&weights, &backbone_prefix, prompt_prefix.as_deref(), &clip)?;
    let specs = trainable_specs(&peclip, &clip);
    let pp = prompt_prefix.clone().unwrap_or_default();
    let trainables = Trainables::from_weights(specs, &weights, |name| {
        if name.starts_with("prompt_learner.") {
            format!("{pp}{name}")
        } else {
            format!("{backbone_prefix}{name}")
        }
    })?;
    // The backbone: every tensor under the backbone prefix that is not an adapter or a prompt.
    let mut backbone = HashMap::new();
    for key in weights.keys() {
        let Some(rel) = key.strip_prefix(backbone_prefix.as_str()) else {
            continue;
        };
        if rel.contains(".adapter_") || rel.starts_with("prompt_learner.") {
            continue;
        }
        let shape = weights
            .shape_of(key)
            .map(<[usize]>::to_vec)
            .unwrap_or_default();
        backbone.insert(rel.to_string(), weights.get(key, &shape)?);
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    crate::io::save_safetensors_atomic(&backbone, &out.join(BACKBONE_FILE))?;
    let config = RunConfig {
        format_version: RUN_FORMAT_VERSION,
        backbone: BackboneRef {
            path: BACKBONE_FILE.into(),
            vision_heads: clip.vision_config.num_attention_heads,
            text_heads: clip.text_config.num_attention_heads,
        },
        preprocess: PreprocessSpec {
            image_size: clip.vision_config.image_size,
            pixel_norm: PixelNorm::None,
        },
        clip,
        peclip,
        classes: ClassSet::default(),
        created_by: created_by(),
    };
    save_run(out, &config, &trainables)?;
    Ok(Imported {
        config,
        backbone_prefix,
        trainable_values: trainables.numel(),
    })
}

//! Write an HF-layout CLIP directory with random weights (`pe-clip init-random`), so that full-size
//! shapes can be loaded, run and benchmarked without downloading anything.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::config::ClipConfig;
use crate::error::{Error, Result};

/// How a tensor is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// N(0, std²).
    Normal(f32),
    /// A constant.
    Const(f32),
}

/// Every tensor an HF `CLIPModel` checkpoint holds for `cfg`, with its shape and a CLIP-like
/// initialisation (N(0, 0.02) weights, unit LayerNorms, zero biases).
pub fn tensor_specs(cfg: &ClipConfig) -> Vec<(String, Vec<usize>, Init)> {
    let mut out = Vec::new();
    let mut push = |k: String, s: Vec<usize>, i: Init| out.push((k, s, i));
    let w = Init::Normal(0.02);
    let zero = Init::Const(0.0);
    let one = Init::Const(1.0);
    let mut layers = |prefix: &str, n: usize, d: usize, h: usize| {
        for i in 0..n {
            let p = format!("{prefix}.encoder.layers.{i}");
            for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                push(format!("{p}.self_attn.{proj}.weight"), vec![d, d], w);
                push(format!("{p}.self_attn.{proj}.bias"), vec![d], zero);
            }
            for ln in ["layer_norm1", "layer_norm2"] {
                push(format!("{p}.{ln}.weight"), vec![d], one);
                push(format!("{p}.{ln}.bias"), vec![d], zero);
            }
            push(format!("{p}.mlp.fc1.weight"), vec![h, d], w);
            push(format!("{p}.mlp.fc1.bias"), vec![h], zero);
            push(format!("{p}.mlp.fc2.weight"), vec![d, h], w);
            push(format!("{p}.mlp.fc2.bias"), vec![d], zero);
        }
    };
    let t = &cfg.text_config;
    let v = &cfg.vision_config;
    layers(
        "text_model",
        t.num_hidden_layers,
        t.hidden_size,
        t.intermediate_size,
    );
    layers(
        "vision_model",
        v.num_hidden_layers,
        v.hidden_size,
        v.intermediate_size,
    );
    let e = cfg.projection_dim;
    out.extend([
        (
            "text_model.embeddings.token_embedding.weight".into(),
            vec![t.vocab_size, t.hidden_size],
            w,
        ),
        (
            "text_model.embeddings.position_embedding.weight".into(),
            vec![t.max_position_embeddings, t.hidden_size],
            Init::Normal(0.01),
        ),
        (
            "text_model.final_layer_norm.weight".into(),
            vec![t.hidden_size],
            one,
        ),
        (
            "text_model.final_layer_norm.bias".into(),
            vec![t.hidden_size],
            zero,
        ),
        ("text_projection.weight".into(), vec![e, t.hidden_size], w),
        (
            "vision_model.embeddings.patch_embedding.weight".into(),
            vec![v.hidden_size, v.num_channels, v.patch_size, v.patch_size],
            w,
        ),
        (
            "vision_model.embeddings.class_embedding".into(),
            vec![v.hidden_size],
            w,
        ),
        (
            "vision_model.embeddings.position_embedding.weight".into(),
            vec![v.num_patches() + 1, v.hidden_size],
            w,
        ),
        (
            "vision_model.pre_layrnorm.weight".into(),
            vec![v.hidden_size],
            one,
        ),
        (
            "vision_model.pre_layrnorm.bias".into(),
            vec![v.hidden_size],
            zero,
        ),
        (
            "vision_model.post_layernorm.weight".into(),
            vec![v.hidden_size],
            one,
        ),
        (
            "vision_model.post_layernorm.bias".into(),
            vec![v.hidden_size],
            zero,
        ),
        ("visual_projection.weight".into(), vec![e, v.hidden_size], w),
        (
            "logit_scale".into(),
            vec![],
            Init::Const(cfg.logit_scale_init_value as f32),
        ),
    ]);
    out
}

/// The seeded generator used for random weights (see [`crate::rng`]).
pub use crate::rng::SeededRng as SeededNormal;

/// Write `config.json`, `model.safetensors` (random weights from `seed`) and the tokenizer files
/// into `dir` (created if needed). Each file is written atomically.
pub fn write_random_model(dir: &Path, cfg: &ClipConfig, seed: u64) -> Result<()> {
    cfg.validate()?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut rng = SeededNormal::new(seed);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (key, shape, init) in tensor_specs(cfg) {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = match init {
            Init::Normal(std) => (0..n).map(|_| rng.normal() * std).collect(),
            Init::Const(c) => vec![c; n],
        };
        tensors.insert(key, Tensor::from_vec(data, shape, &Device::Cpu)?);
    }
    crate::io::save_safetensors_atomic(&tensors, &dir.join(super::WEIGHTS_FILE))?;
    crate::io::write_atomic(&dir.join(super::CONFIG_FILE), cfg.to_hf_json().as_bytes())?;
    crate::tokenizer::write_hf_tokenizer_files(dir)?;
    Ok(())
}

/// [`tensor_specs`] with the initialisation CLIP is trained from scratch with (HF
/// `CLIPPreTrainedModel._init_weights`, factor 1): attention inputs
/// `N(0, (D^-0.5)(2L)^-0.5)`, attention output `N(0, D^-0.5)`, `fc1` `N(0, (2D)^-0.5)`, `fc2` as
/// the attention inputs, the class embedding `N(0, D^-0.5)`, projections `N(0, D^-0.5)`. The
/// flat N(0, 0.02) of [`tensor_specs`] is fine for shapes and speed, but at small widths it leaves
/// every image's feature nearly identical, and training from it stalls.
pub fn tensor_specs_for_training(cfg: &ClipConfig) -> Vec<(String, Vec<usize>, Init)> {
    let t = &cfg.text_config;
    let v = &cfg.vision_config;
    tensor_specs(cfg)
        .into_iter()
        .map(|(key, shape, init)| {
            let (d, layers) = if key.starts_with("text_model") || key == "text_projection.weight" {
                (t.hidden_size as f32, t.num_hidden_layers as f32)
            } else {
                (v.hidden_size as f32, v.num_hidden_layers as f32)
            };
            let in_std = d.powf(-0.5) * (2.0 * layers).powf(-0.5);
            let w = key.ends_with(".weight");
            let std = if !matches!(init, Init::Normal(_)) {
                None
            } else if w
                && ["q_proj", "k_proj", "v_proj"]
                    .iter()
                    .any(|p| key.contains(p))
            {
                Some(in_std)
            } else if w && key.contains("out_proj") {
                Some(d.powf(-0.5))
            } else if w && key.contains("mlp.fc1") {
                Some((2.0 * d).powf(-0.5))
            } else if w && key.contains("mlp.fc2") {
                Some(in_std)
            } else if key.ends_with("class_embedding") || key.ends_with("projection.weight") {
                Some(d.powf(-0.5))
            } else {
                None
            };
            (key, shape, std.map_or(init, Init::Normal))
        })
        .collect()
}

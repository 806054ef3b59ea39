//! The CLIP backbone in candle, loaded from an HF model directory
//! (`config.json`, `model.safetensors`, tokenizer files) as published for
//! `openai/clip-vit-base-patch16` and `-patch32`; any size given by `config.json`.

pub mod attention;
pub mod config;
pub mod encoder;
pub mod fused;
pub mod layers;
pub mod mlp;
pub mod openai;
pub mod pretrain;
pub mod random;
pub mod text;
pub mod vision;
pub mod weights;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub use config::{Arch, ClipConfig, HiddenAct, TextConfig, VisionConfig};
pub use text::TextTower;
pub use vision::VisionTower;
pub use weights::{Vb, Weights};

use crate::error::{Error, Result};

/// The weights file name in an HF directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The config file name in an HF directory.
pub const CONFIG_FILE: &str = "config.json";

/// A whole CLIP model: both towers and the learned `logit_scale`.
#[derive(Debug, Clone)]
pub struct ClipModel {
    pub config: ClipConfig,
    pub vision: VisionTower,
    pub text: TextTower,
    /// The raw (log) logit scale stored in the checkpoint; logits use `exp` of it.
    pub logit_scale: f32,
    pub device: Device,
}

impl ClipModel {
    /// The backbone computing in `dtype` (bf16 or f16: mixed precision): the matmul and
    /// embedding weights cast to it, the LayerNorms' kept in f32 (they and attention's softmax
    /// compute in f32, [`layers`]); features come out in f32.
    pub fn with_compute_dtype(&self, dtype: DType) -> Result<Self> {
        let blocks = |layers: &[encoder::EncoderLayer]| -> Result<Vec<encoder::EncoderLayer>> {
            layers
                .iter()
                .map(|l| {
                    let a = &l.self_attn;
                    Ok(encoder::EncoderLayer {
                        self_attn: attention::Attention {
                            q_proj: a.q_proj.to_dtype(dtype)?,
                            k_proj: a.k_proj.to_dtype(dtype)?,
                            v_proj: a.v_proj.to_dtype(dtype)?,
                            out_proj: a.out_proj.to_dtype(dtype)?,
                            heads: a.heads,
                        },
                        mlp: mlp::Mlp {
                            fc1: l.mlp.fc1.to_dtype(dtype)?,
                            fc2: l.mlp.fc2.to_dtype(dtype)?,
                            act: l.mlp.act,
                        },
                        ..l.clone()
                    })
                })
                .collect()
        };
        let mut m = self.clone();
        let e = &mut m.vision.embeddings;
        e.patch_weight = e.patch_weight.to_dtype(dtype)?;
        e.class_embedding = e.class_embedding.to_dtype(dtype)?;
        e.position_embedding = e.position_embedding.to_dtype(dtype)?;
        m.vision.layers = blocks(&self.vision.layers)?;
        m.vision.projection = self.vision.projection.to_dtype(dtype)?;
        m.text.token_embedding = self.text.token_embedding.to_dtype(dtype)?;
        m.text.position_embedding = self.text.position_embedding.to_dtype(dtype)?;
        m.text.layers = blocks(&self.text.layers)?;
        m.text.projection = self.text.projection.to_dtype(dtype)?;
        Ok(m)
    }

    /// The dtype the backbone computes in (f32 unless [`Self::with_compute_dtype`]).
    pub fn compute_dtype(&self) -> DType {
        self.vision.embeddings.patch_weight.dtype()
    }

    /// Load an HF CLIP directory. Sizes come from `config.json`; every tensor's shape is checked
    /// against them.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config = load_config(dir)?;
        let weights = Weights::open(&weights_path(dir)?, device)?;
        Self::from_weights(config, &weights)
    }

    /// Load a backbone from either an HF directory or a safetensors file in the original OpenAI
    /// layout (sizes inferred from the shapes; `heads` where the shapes cannot tell).
    pub fn load_any(path: &Path, heads: openai::HeadOverrides, device: &Device) -> Result<Self> {
        if path.is_dir() {
            return Self::load(path, device);
        }
        let weights = Weights::open(path, device)?;
        let prefix = openai::find_openai_prefix(&weights).ok_or_else(|| {
            Error::invalid(
                path,
                format!(
                    "neither an HF model directory nor an OpenAI-layout state dict (no `{}`)",
                    openai::OPENAI_MARKER
                ),
            )
        })?;
        let cfg = openai::infer_config(&weights, &prefix, heads)?;
        openai::load_openai(&weights, &prefix, cfg)
    }

    /// Build from an already opened weights file.
    pub fn from_weights(config: ClipConfig, weights: &Weights) -> Result<Self> {
        let root = Vb::root(weights);
        let vision = VisionTower::new(&config.vision_config, config.projection_dim, &root)?;
        let text = TextTower::new(&config.text_config, config.projection_dim, &root)?;
        let logit_scale = read_scalar(weights, "logit_scale")?;
        Ok(Self {
            config,
            vision,
            text,
            logit_scale,
            device: weights.device().clone(),
        })
    }

    /// Projected image features `[N, E]` of normalised pixels `[N, 3, S, S]`.
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        let s = self.config.vision_config.image_size;
        let (_, c, h, w) = pixels.dims4()?;
        if (c, h, w) != (3, s, s) {
            return Err(Error::Config(format!(
                "pixels must be [N, 3, {s}, {s}], got [.., {c}, {h}, {w}]"
            )));
        }
        self.vision.forward(pixels)
    }

    /// Projected text features `[C, E]` of padded token rows.
    pub fn text_features(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        self.text.forward(ids, &self.device)
    }
}

/// Read and validate `dir/config.json`, with a clear error when `dir` is not a model directory.
pub fn load_config(dir: &Path) -> Result<ClipConfig> {
    if !dir.is_dir() {
        return Err(Error::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
        ));
    }
    ClipConfig::from_file(&dir.join(CONFIG_FILE))
}

/// `dir/model.safetensors`, or an error that says what to do when only PyTorch weights exist.
pub fn weights_path(dir: &Path) -> Result<PathBuf> {
    let p = dir.join(WEIGHTS_FILE);
    if p.is_file() {
        return Ok(p);
    }
    let hint = if dir.join("pytorch_model.bin").is_file() {
        "only pytorch_model.bin is present; convert it to model.safetensors (e.g. save_pretrained(..., safe_serialization=True))"
    } else {
        "model.safetensors not found"
    };
    Err(Error::invalid(dir, hint))
}

/// Read a scalar tensor (shape `[]` or `[1]`) as f32.
pub(crate) fn read_scalar(w: &Weights, key: &str) -> Result<f32> {
    let shape = w
        .shape_of(key)
        .map(<[usize]>::to_vec)
        .ok_or_else(|| Error::MissingTensor {
            path: w.path().to_path_buf(),
            key: key.to_string(),
        })?;
    let expected: &[usize] = if shape.is_empty() { &[] } else { &[1] };
    let t = w.get(key, expected)?;
    Ok(t.flatten_all()?.to_vec1::<f32>()?[0])
}

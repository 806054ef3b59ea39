//! HF `config.json` of a CLIP model, parsed tolerantly (unknown fields ignored, HF defaults for
//! missing ones), plus the presets pe-clip can write with `init-random`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The MLP activation named by `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenAct {
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP).
    QuickGelu,
    /// Exact erf GELU.
    Gelu,
    /// tanh-approximated GELU.
    #[serde(alias = "gelu_pytorch_tanh")]
    GeluNew,
}

/// The text tower of `config.json` (`text_config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TextConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    pub hidden_act: HiddenAct,
    pub layer_norm_eps: f64,
}

impl Default for TextConfig {
    fn default() -> Self {
        Self {
            hidden_size: 512,
            intermediate_size: 2048,
            num_attention_heads: 8,
            num_hidden_layers: 12,
            max_position_embeddings: 77,
            vocab_size: 49408,
            hidden_act: HiddenAct::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

/// The vision tower of `config.json` (`vision_config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub hidden_act: HiddenAct,
    pub layer_norm_eps: f64,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_attention_heads: 12,
            num_hidden_layers: 12,
            image_size: 224,
            patch_size: 32,
            num_channels: 3,
            hidden_act: HiddenAct::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

impl VisionConfig {
    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Patches per frame.
    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }
}

/// A whole CLIP `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipConfig {
    pub text_config: TextConfig,
    pub vision_config: VisionConfig,
    pub projection_dim: usize,
    pub logit_scale_init_value: f64,
}

impl Default for ClipConfig {
    fn default() -> Self {
        Self {
            text_config: TextConfig::default(),
            vision_config: VisionConfig::default(),
            projection_dim: 512,
            logit_scale_init_value: 2.6592,
        }
    }
}

/// Architectures `pe-clip init-random` can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    /// `openai/clip-vit-base-patch16`.
    VitB16,
    /// `openai/clip-vit-base-patch32`.
    VitB32,
    /// A tiny model of the same structure for tests and demos (the PE-CLIP fixture's shape).
    Tiny,
}

impl std::str::FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "vit-b16" => Ok(Arch::VitB16),
            "vit-b32" => Ok(Arch::VitB32),
            "tiny" => Ok(Arch::Tiny),
            o => Err(format!(
                "unknown arch {o:?} (expected vit-b16, vit-b32 or tiny)"
            )),
        }
    }
}

impl ClipConfig {
    /// The published configuration of an architecture.
    pub fn preset(arch: Arch) -> Self {
        let mut c = ClipConfig::default();
        match arch {
            Arch::VitB16 => c.vision_config.patch_size = 16,
            Arch::VitB32 => c.vision_config.patch_size = 32,
            Arch::Tiny => {
                // The shape of the PE-CLIP reference fixture: 12 layers, widths 64 / 32.
                c.text_config = TextConfig {
                    hidden_size: 32,
                    intermediate_size: 128,
                    num_attention_heads: 4,
                    num_hidden_layers: 12,
                    ..TextConfig::default()
                };
                c.vision_config = VisionConfig {
                    hidden_size: 64,
                    intermediate_size: 256,
                    num_attention_heads: 4,
                    num_hidden_layers: 12,
                    image_size: 32,
                    patch_size: 16,
                    ..VisionConfig::default()
                };
                c.projection_dim = 32;
            }
        }
        c
    }

    /// Read `config.json` from an HF model directory and validate it.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| match e {
            Error::Config(reason) => Error::invalid(path, reason),
            other => other,
        })
    }

    /// Parse `config.json` text (tolerant, with the `*_config_dict` overrides applied).
    pub fn from_json_str(text: &str) -> Result<Self> {
        let mut v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::Config(format!("invalid json: {e}")))?;
        merge_config_dicts(&mut v);
        let cfg: ClipConfig =
            serde_json::from_value(v).map_err(|e| Error::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The HF `config.json` text for this configuration.
    pub fn to_hf_json(&self) -> String {
        let mut v = serde_json::to_value(self).expect("config serialises");
        v["architectures"] = serde_json::json!(["CLIPModel"]);
        v["model_type"] = "clip".into();
        v["text_config"]["model_type"] = "clip_text_model".into();
        v["vision_config"]["model_type"] = "clip_vision_model".into();
        serde_json::to_string_pretty(&v).expect("json")
    }

    /// Sizes must be positive, widths divisible by the head counts and the image by the patch.
    pub fn validate(&self) -> Result<()> {
        let t = &self.text_config;
        let v = &self.vision_config;
        let positive = [
            ("text_config.hidden_size", t.hidden_size),
            ("text_config.intermediate_size", t.intermediate_size),
            ("text_config.num_attention_heads", t.num_attention_heads),
            ("text_config.num_hidden_layers", t.num_hidden_layers),
            (
                "text_config.max_position_embeddings",
                t.max_position_embeddings,
            ),
            ("text_config.vocab_size", t.vocab_size),
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.intermediate_size", v.intermediate_size),
            ("vision_config.num_attention_heads", v.num_attention_heads),
            ("vision_config.num_hidden_layers", v.num_hidden_layers),
            ("vision_config.image_size", v.image_size),
            ("vision_config.patch_size", v.patch_size),
            ("projection_dim", self.projection_dim),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(Error::Config(format!("{name} must be positive")));
            }
        }
        if t.hidden_size % t.num_attention_heads != 0 {
            return Err(Error::Config(format!(
                "text hidden_size {} is not divisible by num_attention_heads {}",
                t.hidden_size, t.num_attention_heads
            )));
        }
        if v.hidden_size % v.num_attention_heads != 0 {
            return Err(Error::Config(format!(
                "vision hidden_size {} is not divisible by num_attention_heads {}",
                v.hidden_size, v.num_attention_heads
            )));
        }
        if v.image_size % v.patch_size != 0 {
            return Err(Error::Config(format!(
                "image_size {} is not a multiple of patch_size {}",
                v.image_size, v.patch_size
            )));
        }
        if v.num_channels != 3 {
            return Err(Error::Config(format!(
                "num_channels {} is not supported (RGB only)",
                v.num_channels
            )));
        }
        Ok(())
    }
}

/// Older HF CLIP configs carry `text_config_dict` / `vision_config_dict` next to `text_config` /
/// `vision_config`; HF's `CLIPConfig` lets the `_dict` values win. Do the same.
fn merge_config_dicts(v: &mut serde_json::Value) {
    for (cfg, dict) in [
        ("text_config", "text_config_dict"),
        ("vision_config", "vision_config_dict"),
    ] {
        let Some(serde_json::Value::Object(overrides)) = v.get(dict).cloned() else {
            continue;
        };
        if !v.get(cfg).is_some_and(serde_json::Value::is_object) {
            v[cfg] = serde_json::json!({});
        }
        if let Some(target) = v[cfg].as_object_mut() {
            target.extend(overrides);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of `openai/clip-vit-base-patch16`'s config.json: full sub-configs with many
    /// fields pe-clip ignores, some null, plus `_dict` overrides.
    #[test]
    fn parses_hf_style_config_with_dict_overrides() {
        let text = r#"{
          "architectures": ["CLIPModel"], "initializer_factor": 1.0,
          "logit_scale_init_value": 2.6592, "model_type": "clip", "projection_dim": 512,
          "text_config": {"architectures": null, "bos_token_id": 0, "eos_token_id": 2,
            "hidden_act": "quick_gelu", "hidden_size": 512, "intermediate_size": 2048,
            "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "num_attention_heads": 8,
            "num_hidden_layers": 12, "vocab_size": 49408, "id2label": {"0": "LABEL_0"}},
          "text_config_dict": {"hidden_act": "quick_gelu"},
          "vision_config": {"hidden_act": "quick_gelu", "hidden_size": 768, "image_size": 224,
            "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
            "patch_size": 32, "prefix": null},
          "vision_config_dict": {"hidden_act": "quick_gelu", "patch_size": 16},
          "torch_dtype": "float32", "transformers_version": null
        }"#;
        let cfg = ClipConfig::from_json_str(text).unwrap();
        assert_eq!(cfg, ClipConfig::preset(Arch::VitB16));
        assert_eq!(cfg.vision_config.num_patches(), 196);
    }

    #[test]
    fn rejects_inconsistent_sizes() {
        for bad in [
            r#"{"vision_config": {"image_size": 225, "patch_size": 16}}"#,
            r#"{"text_config": {"hidden_size": 100, "num_attention_heads": 8}}"#,
            r#"{"projection_dim": 0}"#,
            r#"{"vision_config": {"hidden_act": "relu"}}"#,
        ] {
            assert!(ClipConfig::from_json_str(bad).is_err(), "{bad}");
        }
    }
}

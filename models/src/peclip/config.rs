//! PE-CLIP's own configuration: which adapters and prompts exist and how they are shaped.
//! Defaults are the paper's model (reference sections 1 to 4); every ablation of paper Tables 5 to
//! 9 is a change of these fields, no code edit.

use serde::{Deserialize, Serialize};

use crate::clip::ClipConfig;
use crate::error::{Error, Result};

/// Format version of the serialised config (in checkpoints and run directories).
pub const PECLIP_CONFIG_VERSION: u32 = 1;

/// MaPLe multimodal prompts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PromptConfig {
    /// Whether the prompt learner exists at all.
    pub enabled: bool,
    /// Prompt depth J: layer-0 prompts plus J - 1 deep prompts entering blocks 1..J-1.
    pub depth: usize,
    /// Context tokens per modality (n_ctx).
    pub tokens: usize,
}

impl Default for PromptConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            depth: 9,
            tokens: 2,
        }
    }
}

/// Which adapters are present (in every block of their encoder).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdapterSwitches {
    /// Shared Adapter after attention in the vision blocks.
    pub vision_shared: bool,
    /// Temporal Dynamic Adapter after the MLP in the vision blocks.
    pub temporal: bool,
    /// Shared Adapter after attention in the text blocks.
    pub text_shared: bool,
    /// Textual Adapter after the MLP in the text blocks.
    pub text: bool,
}

impl Default for AdapterSwitches {
    fn default() -> Self {
        Self {
            vision_shared: true,
            temporal: true,
            text_shared: true,
            text: true,
        }
    }
}

/// Where the TDA's dynamic scale `s = ReLU(w_s LN(M) + b_s)` multiplies (paper Table 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScaleAt {
    /// `cell(s * down(LN(M)))`.
    Input,
    /// `up(GELU(s * cell(...)))`.
    GruOutput,
    /// `s * up(GELU(cell(...)))` (the reference).
    #[default]
    PostUp,
}

/// The recurrent cell inside the TDA (paper Table 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TemporalCell {
    /// 1-layer GRU (the reference).
    #[default]
    Gru,
    /// 1-layer Elman RNN with tanh.
    Rnn,
    /// 1-layer LSTM.
    Lstm,
    /// No cell, no LayerNorm, no scale: a plain bottleneck adapter ("vanilla adapter").
    None,
}

/// The whole PE-CLIP configuration (independent of the backbone's sizes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeClipConfig {
    /// Must equal [`PECLIP_CONFIG_VERSION`].
    pub format_version: u32,
    /// Adapter bottleneck = width / reduction.
    pub reduction: usize,
    pub prompts: PromptConfig,
    pub adapters: AdapterSwitches,
    pub scale_at: ScaleAt,
    pub temporal_cell: TemporalCell,
    /// Logits are `logit_scale * cosine` (the reference divides by 0.01).
    pub logit_scale: f32,
}

impl Default for PeClipConfig {
    fn default() -> Self {
        Self {
            format_version: PECLIP_CONFIG_VERSION,
            reduction: 8,
            prompts: PromptConfig::default(),
            adapters: AdapterSwitches::default(),
            scale_at: ScaleAt::default(),
            temporal_cell: TemporalCell::default(),
            logit_scale: 100.0,
        }
    }
}

impl PeClipConfig {
    /// Check the values against themselves and against the backbone they will sit in.
    pub fn validate(&self, clip: &ClipConfig) -> Result<()> {
        if self.format_version != PECLIP_CONFIG_VERSION {
            return Err(Error::Config(format!(
                "PE-CLIP config format_version {} is not supported (expected {PECLIP_CONFIG_VERSION})",
                self.format_version
            )));
        }
        let (dv, dt) = (clip.vision_config.hidden_size, clip.text_config.hidden_size);
        if self.reduction == 0 || dt / self.reduction == 0 || dv / self.reduction == 0 {
            return Err(Error::Config(format!(
                "reduction {} leaves no bottleneck for widths {dv} / {dt}",
                self.reduction
            )));
        }
        if self.prompts.enabled {
            let layers = clip
                .vision_config
                .num_hidden_layers
                .min(clip.text_config.num_hidden_layers);
            if self.prompts.tokens == 0 || self.prompts.depth == 0 || self.prompts.depth > layers {
                return Err(Error::Config(format!(
                    "prompt depth {} and tokens {} must be positive, depth at most {layers}",
                    self.prompts.depth, self.prompts.tokens
                )));
            }
        }
        if !(self.logit_scale.is_finite() && self.logit_scale > 0.0) {
            return Err(Error::Config("logit_scale must be positive".into()));
        }
        Ok(())
    }

    /// Bottleneck width of the vision adapters.
    pub fn vision_bottleneck(&self, clip: &ClipConfig) -> usize {
        clip.vision_config.hidden_size / self.reduction
    }

    /// Bottleneck width of the text adapters.
    pub fn text_bottleneck(&self, clip: &ClipConfig) -> usize {
        clip.text_config.hidden_size / self.reduction
    }

    /// The prompt text of a class: `"X X ... " + descriptor` (one X per context token) when
    /// prompts are on, the bare descriptor otherwise.
    pub fn class_text(&self, descriptor: &str) -> String {
        if self.prompts.enabled {
            format!("{}{descriptor}", "X ".repeat(self.prompts.tokens))
        } else {
            descriptor.to_string()
        }
    }
}

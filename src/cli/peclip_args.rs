//! The PE-CLIP configuration flags shared by the subcommands that build a model.
// Used by subcommands that need the `train` feature.
#![cfg_attr(not(feature = "train"), allow(dead_code))]

/// PE-CLIP architecture flags (defaults: the paper's model).
#[derive(Debug, Clone, clap::Args)]
pub struct PeClipArgs {
    /// Adapter reduction factor r (bottleneck = width / r).
    #[arg(long, default_value_t = 8)]
    pub reduction: usize,
    /// MaPLe prompt depth J (layer-0 prompts plus J - 1 deep prompts).
    #[arg(long, default_value_t = 9)]
    pub prompt_depth: usize,
    /// MaPLe context tokens per modality.
    #[arg(long, default_value_t = 2)]
    pub prompt_tokens: usize,
    /// Leave out the MaPLe prompts.
    #[arg(long)]
    pub no_prompts: bool,
    /// Leave out the Shared Adapters of the vision blocks.
    #[arg(long)]
    pub no_vision_shared: bool,
    /// Leave out the Temporal Dynamic Adapters.
    #[arg(long)]
    pub no_temporal: bool,
    /// Leave out the Shared Adapters of the text blocks.
    #[arg(long)]
    pub no_text_shared: bool,
    /// Leave out the Textual Adapters.
    #[arg(long)]
    pub no_text_adapter: bool,
    /// Recurrent cell of the TDA: gru, rnn, lstm, or none (a plain bottleneck adapter).
    #[arg(long, default_value = "gru", value_parser = ["gru", "rnn", "lstm", "none"])]
    pub temporal_cell: String,
    /// Where the TDA's dynamic scale applies: input, gru-output or post-up.
    #[arg(long, default_value = "post-up", value_parser = ["input", "gru-output", "post-up"])]
    pub scale_at: String,
}

#[cfg(feature = "train")]
impl PeClipArgs {
    /// The library configuration these flags describe.
    pub fn to_config(&self) -> pe_clip_models::peclip::PeClipConfig {
        use pe_clip_models::peclip::{
            AdapterSwitches, PeClipConfig, PromptConfig, ScaleAt, TemporalCell,
        };
        PeClipConfig {
            reduction: self.reduction,
            prompts: PromptConfig {
                enabled: !self.no_prompts,
                depth: self.prompt_depth,
                tokens: self.prompt_tokens,
            },
            adapters: AdapterSwitches {
                vision_shared: !self.no_vision_shared,
                temporal: !self.no_temporal,
                text_shared: !self.no_text_shared,
                text: !self.no_text_adapter,
            },
            temporal_cell: match self.temporal_cell.as_str() {
                "rnn" => TemporalCell::Rnn,
                "lstm" => TemporalCell::Lstm,
                "none" => TemporalCell::None,
                _ => TemporalCell::Gru,
            },
            scale_at: match self.scale_at.as_str() {
                "input" => ScaleAt::Input,
                "gru-output" => ScaleAt::GruOutput,
                _ => ScaleAt::PostUp,
            },
            ..PeClipConfig::default()
        }
    }
}

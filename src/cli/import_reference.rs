//! `pe-clip import-reference`: turn a checkpoint of the PE-CLIP authors' code into a run directory.

use std::path::PathBuf;

/// Arguments of `pe-clip import-reference`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The authors' state dict as safetensors (backbone in OpenAI CLIP naming, adapters,
    /// `prompt_learner.*`; `module.` prefixes are fine).
    #[arg(value_name = "STATE_DICT")]
    source: PathBuf,
    /// The run directory to write.
    #[arg(short, long, value_name = "RUN_DIR")]
    output: PathBuf,
    /// Vision attention heads (default: width / 64, as CLIP's build_model).
    #[arg(long)]
    vision_heads: Option<usize>,
    /// Text attention heads (default: width / 64).
    #[arg(long)]
    text_heads: Option<usize>,
}

#[cfg(feature = "train")]
pub fn run(args: Args) -> anyhow::Result<u8> {
    use anyhow::Context;
    use pe_clip_models::clip::openai::HeadOverrides;
    use pe_clip_models::peclip::import::import_reference;

    let heads = HeadOverrides {
        vision: args.vision_heads,
        text: args.text_heads,
    };
    let imported = import_reference(&args.source, &args.output, heads)
        .with_context(|| format!("cannot import {}", args.source.display()))?;
    let c = &imported.config;
    let v = &c.clip.vision_config;
    let t = &c.clip.text_config;
    log::info!(
        "backbone prefix {:?}: vision {}x{} ({} heads, patch {}, image {}), text {}x{} ({} heads)",
        imported.backbone_prefix,
        v.num_hidden_layers,
        v.hidden_size,
        v.num_attention_heads,
        v.patch_size,
        v.image_size,
        t.num_hidden_layers,
        t.hidden_size,
        t.num_attention_heads
    );
    println!(
        "{}: r = {}, prompts {}, cell {}, {} trainable values",
        args.output.display(),
        c.peclip.reduction,
        if c.peclip.prompts.enabled {
            format!(
                "depth {} x {}",
                c.peclip.prompts.depth, c.peclip.prompts.tokens
            )
        } else {
            "off".into()
        },
        super::serde_name(&c.peclip.temporal_cell),
        imported.trainable_values
    );
    Ok(super::EXIT_OK)
}

#[cfg(not(feature = "train"))]
pub fn run(_args: Args) -> anyhow::Result<u8> {
    Err(super::built_without_train("import-reference"))
}

//! `pe-clip info`: the trainable-parameter breakdown of a PE-CLIP configuration.

use std::path::PathBuf;

use super::peclip_args::PeClipArgs;

/// Arguments of `pe-clip info`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Backbone architecture: vit-b16, vit-b32 or tiny.
    #[arg(long, default_value = "vit-b16", conflicts_with = "clip")]
    arch: String,
    /// Take the backbone sizes from an HF CLIP directory instead of --arch.
    #[arg(long, value_name = "HF_DIR")]
    clip: Option<PathBuf>,
    #[command(flatten)]
    peclip: PeClipArgs,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[cfg(feature = "train")]
pub fn run(args: Args) -> anyhow::Result<u8> {
    use pe_clip_models::clip::{load_config, Arch, ClipConfig};
    use pe_clip_models::peclip::{breakdown, Part};

    let (clip, name) = match &args.clip {
        Some(dir) => (load_config(dir)?, dir.display().to_string()),
        None => {
            let arch: Arch = args.arch.parse().map_err(anyhow::Error::msg)?;
            (ClipConfig::preset(arch), args.arch.clone())
        }
    };
    let cfg = args.peclip.to_config();
    cfg.validate(&clip)?;
    let b = breakdown(&cfg, &clip);
    let total = b.trainable_total + b.frozen_backbone;
    let share = 100.0 * b.trainable_total as f64 / total as f64;
    if args.json {
        let v = serde_json::json!({
            "backbone": name,
            "config": cfg,
            "trainable_total": b.trainable_total,
            "adapters": b.adapters,
            "prompt_learner": b.prompt_learner,
            "parts": b.parts,
            "frozen_backbone": b.frozen_backbone,
            "total": total,
            "trainable_percent": share,
        });
        println!("{v}");
        return Ok(super::EXIT_OK);
    }
    let label = |p: Part| match p {
        Part::VisionShared => "vision shared adapters (ShA)",
        Part::Temporal => "temporal dynamic adapters (TDA)",
        Part::TextShared => "text shared adapters (ShA)",
        Part::Text => "textual adapters (TA)",
        Part::PromptContext => "prompt context (layer 0)",
        Part::PromptProjection => "prompt projection (layer 0)",
        Part::DeepPrompts => "deep text prompts",
        Part::DeepProjections => "deep prompt projections",
    };
    use super::serde_name;
    use super::table::group_digits;
    println!(
        "PE-CLIP on {name}: r = {}, prompts {}, cell {}, scale at {}",
        cfg.reduction,
        if cfg.prompts.enabled {
            format!(
                "depth {} x {} tokens",
                cfg.prompts.depth, cfg.prompts.tokens
            )
        } else {
            "off".into()
        },
        serde_name(&cfg.temporal_cell),
        serde_name(&cfg.scale_at),
    );
    let row = |k: &str, v: usize| println!("  {k:<34} {:>13}", group_digits(v));
    for (p, n) in &b.parts {
        row(label(*p), *n);
    }
    row("adapters", b.adapters);
    row("prompt learner", b.prompt_learner);
    row("trainable total", b.trainable_total);
    row("frozen backbone", b.frozen_backbone);
    println!("  trainable share {share:>32.2} %");
    Ok(super::EXIT_OK)
}

#[cfg(not(feature = "train"))]
pub fn run(_args: Args) -> anyhow::Result<u8> {
    Err(super::built_without_train("info"))
}

//! `pe-clip info`: the trainable-parameter breakdown of a PE-CLIP configuration, or what a
//! package holds and what its step costs on this CPU.

use std::path::PathBuf;

use super::peclip_args::PeClipArgs;

/// Arguments of `pe-clip info`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Backbone architecture: vit-b16, vit-b32 or tiny.
    #[arg(long, default_value = "vit-b16", conflicts_with_all = ["clip", "package"])]
    arch: String,
    /// Instead: describe this package (`demo`: the one built in).
    #[arg(long, value_name = "PACKAGE_DIR", conflicts_with = "clip")]
    package: Option<PathBuf>,
    /// With --package: multiply-accumulates per step by operator class, and the matrix kernels
    /// tract runs on this CPU.
    #[arg(long, requires = "package")]
    cost: bool,
    /// Take the backbone sizes from an HF CLIP directory instead of --arch.
    #[arg(long, value_name = "HF_DIR")]
    clip: Option<PathBuf>,
    #[command(flatten)]
    peclip: PeClipArgs,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    match &args.package {
        Some(dir) => package_info(dir, args.cost, args.json),
        None => breakdown(args),
    }
}

/// `info --package`: the manifest's summary, and with `cost` the step's cost here.
fn package_info(dir: &std::path::Path, cost: bool, json: bool) -> anyhow::Result<u8> {
    use crate::package::Package;
    let pkg = Package::open_or_demo(dir)?;
    let m = &pkg.manifest;
    let bytes = pkg.model_bytes()?;
    let name = if pkg.is_embedded() {
        "the built-in demo package".to_string()
    } else {
        dir.display().to_string()
    };
    let cost = if cost {
        let model = pkg.step_model()?;
        Some(model.cost(&bytes, &pkg.model_path().display().to_string())?)
    } else {
        None
    };
    let machine = crate::engine::machine();
    if json {
        let v = serde_json::json!({
            "package": name,
            "precision": m.precision.to_string(),
            "model_bytes": bytes.len(),
            "image_size": m.preprocess.image_size,
            "window": m.temporal.window,
            "stride": m.temporal.stride,
            "classes": pkg.class_names(),
            "state_floats": m.state.iter().map(|s| s.rows * s.width).sum::<usize>(),
            "machine": machine,
            "int8_form": format!("{:?}", crate::engine::Int8Form::for_this_cpu()),
            "cost": cost,
        });
        println!("{v}");
        return Ok(super::EXIT_OK);
    }
    use super::table::group_digits;
    println!(
        "{name}: {} step model, {:.1} MB, {} px, window {} stride {}, {} classes, {} recurrent states ({} floats)",
        m.precision,
        bytes.len() as f64 / 1e6,
        m.preprocess.image_size,
        m.temporal.window,
        m.temporal.stride,
        pkg.class_names().len(),
        m.state.len(),
        group_digits(m.state.iter().map(|s| s.rows * s.width).sum()),
    );
    let Some(cost) = cost else {
        return Ok(super::EXIT_OK);
    };
    println!("per step, as written:");
    for c in &cost.classes {
        let unit = if c.class == "other" {
            "elements"
        } else {
            "MACs"
        };
        println!(
            "  {:<12} {:>5} nodes {:>18} {unit}",
            c.class,
            c.nodes,
            group_digits(c.macs as usize)
        );
    }
    let form = match m.precision.to_string().as_str() {
        "int8" => format!("; int8 form {:?}", crate::engine::Int8Form::for_this_cpu()),
        _ => String::new(),
    };
    println!("on this machine ({machine}{form}), tract's matrix kernels:");
    for k in &cost.kernels {
        println!(
            "  {:<34} {:>5} nodes {:>18} MACs  {}",
            k.kernel,
            k.nodes,
            group_digits(k.macs as usize),
            k.packing
        );
    }
    let total: u64 = cost.plan_other.iter().map(|c| c.macs).sum();
    println!(
        "and its other operators, {} elements in all:",
        group_digits(total as usize)
    );
    for c in cost.plan_other.iter().take(12) {
        println!(
            "  {:<34} {:>5} nodes {:>18} elements",
            c.class,
            c.nodes,
            group_digits(c.macs as usize)
        );
    }
    Ok(super::EXIT_OK)
}

#[cfg(feature = "train")]
fn breakdown(args: Args) -> anyhow::Result<u8> {
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
fn breakdown(_args: Args) -> anyhow::Result<u8> {
    Err(super::built_without_train("info without --package"))
}

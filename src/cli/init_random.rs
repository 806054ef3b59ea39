//! `pe-clip init-random`: write an HF-layout CLIP directory with random weights, and optionally a
//! freshly initialised PE-CLIP run directory over it.

use std::path::PathBuf;

use super::peclip_args::PeClipArgs;

/// Arguments of `pe-clip init-random`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Architecture: vit-b16 (openai/clip-vit-base-patch16), vit-b32, or tiny.
    #[arg(long, default_value = "vit-b16")]
    arch: String,
    /// Seed of the weights (the same seed writes the same weights).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write a PE-CLIP run directory with the reference initialisation over this backbone.
    #[arg(long, value_name = "RUN_DIR")]
    run: Option<PathBuf>,
    #[command(flatten)]
    peclip: PeClipArgs,
    /// Directory to write (created if missing; existing model files are replaced).
    dir: PathBuf,
}

#[cfg(feature = "train")]
pub fn run(args: Args) -> anyhow::Result<u8> {
    use anyhow::Context;
    use pe_clip_models::clip::{random::write_random_model, Arch, ClipConfig};
    use pe_clip_models::peclip::checkpoint::{created_by, BackboneRef, RUN_FORMAT_VERSION};
    use pe_clip_models::peclip::{save_run, trainable_specs, RunConfig, Trainables};
    use pe_clip_models::{ClassSet, PixelNorm, PreprocessSpec};

    let arch: Arch = args.arch.parse().map_err(anyhow::Error::msg)?;
    let cfg = ClipConfig::preset(arch);
    let peclip = args.peclip.to_config();
    if args.run.is_some() {
        peclip.validate(&cfg)?;
    }
    let t = std::time::Instant::now();
    write_random_model(&args.dir, &cfg, args.seed)
        .with_context(|| format!("writing a random {} model", args.arch))?;
    log::info!(
        "wrote {} in {:.1} s",
        args.dir.display(),
        t.elapsed().as_secs_f64()
    );
    println!("{}", args.dir.display());
    if let Some(run_dir) = &args.run {
        let backbone = std::path::absolute(&args.dir)
            .with_context(|| format!("resolving {}", args.dir.display()))?;
        let specs = trainable_specs(&peclip, &cfg);
        let trainables = Trainables::init(specs, args.seed, &candle_core::Device::Cpu)?;
        let run = RunConfig {
            format_version: RUN_FORMAT_VERSION,
            backbone: BackboneRef {
                path: backbone,
                vision_heads: cfg.vision_config.num_attention_heads,
                text_heads: cfg.text_config.num_attention_heads,
            },
            preprocess: PreprocessSpec {
                image_size: cfg.vision_config.image_size,
                pixel_norm: PixelNorm::None,
            },
            clip: cfg,
            peclip,
            classes: ClassSet::default(),
            created_by: created_by(),
        };
        save_run(run_dir, &run, &trainables)
            .with_context(|| format!("writing run directory {}", run_dir.display()))?;
        println!("{}", run_dir.display());
    }
    Ok(super::EXIT_OK)
}

#[cfg(not(feature = "train"))]
pub fn run(_args: Args) -> anyhow::Result<u8> {
    Err(super::built_without_train("init-random"))
}

//! `pe-clip init-random`: write an HF-layout CLIP directory with random weights.

use std::path::PathBuf;

/// Arguments of `pe-clip init-random`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Architecture: vit-b16 (openai/clip-vit-base-patch16), vit-b32, or tiny.
    #[arg(long, default_value = "vit-b16")]
    arch: String,
    /// Seed of the weights (the same seed writes the same weights).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Directory to write (created if missing; existing model files are replaced).
    dir: PathBuf,
}

#[cfg(feature = "train")]
pub fn run(args: Args) -> anyhow::Result<u8> {
    use anyhow::Context;
    use pe_clip_models::clip::{random::write_random_model, Arch, ClipConfig};
    let arch: Arch = args.arch.parse().map_err(anyhow::Error::msg)?;
    let cfg = ClipConfig::preset(arch);
    let t = std::time::Instant::now();
    write_random_model(&args.dir, &cfg, args.seed)
        .with_context(|| format!("writing a random {} model", args.arch))?;
    log::info!(
        "wrote {} in {:.1} s",
        args.dir.display(),
        t.elapsed().as_secs_f64()
    );
    println!("{}", args.dir.display());
    Ok(super::EXIT_OK)
}

#[cfg(not(feature = "train"))]
pub fn run(_args: Args) -> anyhow::Result<u8> {
    Err(super::built_without_train("init-random"))
}

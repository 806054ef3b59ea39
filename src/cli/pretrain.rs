//! `pe-clip pretrain`: pre-train a small CLIP-shaped backbone contrastively on synthetic face
//! frames and their action-unit captions (a stand-in for CLIP weights where none exist).

use std::path::PathBuf;

/// Arguments of `pe-clip pretrain`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// HF CLIP directory to write (`config.json`, `model.safetensors`, tokenizer, `pretrain.json`).
    #[arg(long)]
    out: PathBuf,
    /// Shape: tiny, vit-b16 or vit-b32 (then --image-size / --patch-size adjust it).
    #[arg(long, default_value = "tiny", conflicts_with = "init")]
    arch: String,
    /// Continue pre-training this HF CLIP directory (e.g. an earlier `pretrain --out`) instead of
    /// starting from scratch; the shape and temperature are its own. Give a new --seed so that
    /// the frames are new ones.
    #[arg(long, value_name = "DIR")]
    init: Option<PathBuf>,
    /// Input size in pixels (overrides the arch's).
    #[arg(long, conflicts_with = "init")]
    image_size: Option<usize>,
    /// Patch size in pixels (overrides the arch's).
    #[arg(long, conflicts_with = "init")]
    patch_size: Option<usize>,
    /// Optimiser steps.
    #[arg(long, default_value_t = 2000)]
    steps: usize,
    /// Frames per step, each from a different random clip and identity.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    #[arg(long, default_value_t = 100)]
    warmup_steps: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Size the generator draws at (frames are then resized to --image-size, as `synth` clips
    /// are when read).
    #[arg(long, default_value_t = 64)]
    render_size: u32,
    /// Pixel normalisation the backbone is trained with: none (x/255, what PE-CLIP feeds) or clip.
    #[arg(long, default_value = "none")]
    pixel_norm: String,
    /// Weight of the auxiliary AU-regression loss on the image feature (0: contrastive only).
    #[arg(long, default_value_t = 1.0)]
    au_weight: f64,
    /// Initial temperature exp(logit_scale), learned up to 100 (PE-CLIP scales logits by 100).
    #[arg(long, default_value_t = 100.0)]
    temperature: f32,
    /// Near-infrared grayscale frames.
    #[arg(long)]
    ir: bool,
    /// Log every this many steps.
    #[arg(long, default_value_t = 50)]
    log_every: usize,
    /// Compute device: cpu, or cuda (needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[cfg(feature = "train")]
pub fn run(args: Args) -> anyhow::Result<u8> {
    crate::cli::keep_large_allocations();
    use anyhow::Context;
    use pe_clip_models::clip::pretrain::{pretrain, PretrainConfig};
    use pe_clip_models::clip::weights::Weights;
    use pe_clip_models::clip::{load_config, weights_path, Arch, ClipConfig};
    use pe_clip_models::PreprocessSpec;

    let device = super::zero_shot::device_from_name(&args.device)?;
    let (clip, init) = match &args.init {
        Some(dir) => {
            let clip = load_config(dir).with_context(|| format!("--init {}", dir.display()))?;
            let w = Weights::open(&weights_path(dir)?, &device)
                .with_context(|| format!("--init {}", dir.display()))?;
            (clip, Some(w))
        }
        None => {
            let arch: Arch = args.arch.parse().map_err(anyhow::Error::msg)?;
            let mut clip = ClipConfig::preset(arch);
            if let Some(s) = args.image_size {
                clip.vision_config.image_size = s;
            }
            if let Some(p) = args.patch_size {
                clip.vision_config.patch_size = p;
            }
            clip.validate()
                .context("invalid --image-size / --patch-size")?;
            (clip, None)
        }
    };
    let pc = PretrainConfig {
        steps: args.steps,
        batch_size: args.batch_size,
        lr: args.lr,
        weight_decay: args.weight_decay,
        warmup_steps: args.warmup_steps,
        seed: args.seed,
        render_size: args.render_size,
        preprocess: PreprocessSpec {
            image_size: clip.vision_config.image_size,
            pixel_norm: args.pixel_norm.parse().map_err(anyhow::Error::msg)?,
        },
        distractors: true,
        infrared: args.ir,
        au_weight: args.au_weight,
        temperature: args.temperature,
    };
    let quiet = log::max_level() < log::LevelFilter::Warn;
    let (steps, every) = (pc.steps, args.log_every.max(1));
    let mut window: Vec<(f32, f32, f32)> = Vec::new();
    let mut report = |r: &pe_clip_models::clip::pretrain::PretrainRecord| {
        window.push((r.loss, r.accuracy, r.au_loss));
        if !quiet && (r.step.is_multiple_of(every) || r.step == steps) {
            let n = window.len() as f32;
            let loss = window.iter().map(|w| w.0).sum::<f32>() / n;
            let acc = window.iter().map(|w| w.1).sum::<f32>() / n;
            let au = window.iter().map(|w| w.2).sum::<f32>() / n;
            eprintln!(
                "step {}/{steps}  loss {loss:.4}  AU mse {au:.4}  caption top-1 {:.1} %  lr {:.1e}  temperature {:.1}  {:.0} s",
                r.step,
                100.0 * acc,
                r.lr,
                r.temperature,
                r.seconds
            );
            window.clear();
        }
    };
    let r = pretrain(&clip, &pc, init.as_ref(), &args.out, &device, &mut report)
        .context("pre-training failed")?;
    println!(
        "{}: {} steps of {} frames in {:.0} s (rendering {:.0} s); use it with --arch {0} or --clip {0}",
        args.out.display(),
        pc.steps,
        pc.batch_size,
        r.seconds,
        r.render_seconds
    );
    Ok(super::EXIT_OK)
}

#[cfg(not(feature = "train"))]
pub fn run(_args: Args) -> anyhow::Result<u8> {
    Err(super::built_without_train("pretrain"))
}

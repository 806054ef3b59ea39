//! `pe-clip predict`: expression recognition of clips with a trained PE-CLIP run directory.

use std::path::PathBuf;

/// Arguments of `pe-clip predict`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A run directory (from `pe-clip train` or `pe-clip import-reference`).
    #[arg(long, value_name = "RUN_DIR")]
    checkpoint: PathBuf,
    /// Clips: folders of JPEG/PNG frames (name order) or .y4m files.
    #[arg(required = true, value_name = "CLIP")]
    clips: Vec<PathBuf>,
    /// Pixel normalisation after /255: none or clip (default: the run's, `none` for PE-CLIP).
    #[arg(long)]
    pixel_norm: Option<String>,
    /// Frames sampled per clip (test-time sampling).
    #[arg(long, default_value_t = pe_clip_models::sampling::NUM_SEGMENTS)]
    frames: usize,
    /// Print one JSON object per clip instead of a table.
    #[arg(long)]
    json: bool,
    /// Compute device: cpu, or cuda (needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[cfg(feature = "train")]
pub fn run(args: Args) -> anyhow::Result<u8> {
    use super::zero_shot::device_from_name;
    use anyhow::{bail, Context};
    use pe_clip_models::peclip::{load_run, GruMode};
    use pe_clip_models::prediction::Prediction;
    use pe_clip_models::video::load_sampled_clip;
    use pe_clip_models::zero_shot::pixels_of;
    use pe_clip_models::PixelNorm;

    if args.frames == 0 {
        bail!("--frames must be at least 1");
    }
    let device = device_from_name(&args.device)?;
    let t = std::time::Instant::now();
    let (model, run) = load_run(&args.checkpoint, &device).context("cannot load the run")?;
    log::info!(
        "loaded {} in {:.2} s",
        args.checkpoint.display(),
        t.elapsed().as_secs_f64()
    );
    let mut spec = run.preprocess;
    if let Some(p) = &args.pixel_norm {
        spec.pixel_norm = p.parse::<PixelNorm>().map_err(anyhow::Error::msg)?;
    }
    let names = model.classes.names();
    let text = pe_clip_models::zero_shot::l2_normalize(&model.text_features()?)?;
    super::zero_shot::print_predictions(&args.clips, &names, args.json, |clip| {
        let t = std::time::Instant::now();
        let sampled = load_sampled_clip(clip, args.frames)?;
        let pixels = pixels_of(&sampled, &spec, &device)?.unsqueeze(0)?;
        let logits = model
            .forward_with_text(&pixels, GruMode::PerVideo, &text)?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        log::info!(
            "{}: {} frames in {:.1} ms",
            clip.display(),
            args.frames,
            t.elapsed().as_secs_f64() * 1e3
        );
        Ok(Prediction::new(
            clip.display().to_string(),
            logits,
            &names,
            sampled.skipped.len(),
        ))
    })
}

#[cfg(not(feature = "train"))]
pub fn run(_args: Args) -> anyhow::Result<u8> {
    Err(super::built_without_train("predict"))
}

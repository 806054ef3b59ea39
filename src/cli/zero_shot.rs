//! `pe-clip zero-shot`: zero-shot expression recognition of clips with plain CLIP.

use std::path::PathBuf;

/// Arguments of `pe-clip zero-shot`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// HF CLIP model directory (config.json, model.safetensors, tokenizer files), e.g. a local
    /// copy of openai/clip-vit-base-patch16.
    #[arg(long = "clip", value_name = "HF_DIR")]
    model: PathBuf,
    /// Clips: folders of JPEG/PNG frames (name order) or .y4m files.
    #[arg(required = true, value_name = "CLIP")]
    clips: Vec<PathBuf>,
    /// Class list with action-unit texts (JSON; default: the built-in 7 classes).
    #[arg(long, value_name = "FILE")]
    classes: Option<PathBuf>,
    /// Pixel normalisation after /255: clip (CLIP mean/std) or none.
    #[arg(long, default_value = "clip")]
    pixel_norm: String,
    /// Frames sampled per clip.
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
    use anyhow::{bail, Context};
    use pe_clip_models::zero_shot::ZeroShot;
    use pe_clip_models::{ClassSet, PixelNorm, PreprocessSpec};

    if args.frames == 0 {
        bail!("--frames must be at least 1");
    }
    let pixel_norm: PixelNorm = args.pixel_norm.parse().map_err(anyhow::Error::msg)?;
    let classes = match &args.classes {
        Some(p) => ClassSet::from_file(p)?,
        None => ClassSet::default(),
    };
    let device = device_from_name(&args.device)?;
    let t = std::time::Instant::now();
    let spec = PreprocessSpec {
        image_size: 0, // taken from the model's config
        pixel_norm,
    };
    let zs = ZeroShot::new(&args.model, classes, spec, args.frames, &device)
        .context("cannot load the CLIP model")?;
    log::info!(
        "loaded {} in {:.2} s",
        args.model.display(),
        t.elapsed().as_secs_f64()
    );

    let names = zs.classes.names();
    print_predictions(&args.clips, &names, args.json, |clip| {
        let t = std::time::Instant::now();
        let r = zs.classify(clip)?;
        log::info!(
            "{}: {} frames in {:.1} ms",
            r.clip,
            args.frames,
            t.elapsed().as_secs_f64() * 1e3
        );
        Ok(r)
    })
}

/// Run `predict` on every clip and print each result as a table row or a JSON line; a clip that
/// fails is reported on stderr and the others go on. Returns the exit code.
#[cfg(feature = "train")]
pub(crate) fn print_predictions(
    clips: &[PathBuf],
    names: &[&str],
    json: bool,
    mut predict: impl FnMut(
        &std::path::Path,
    )
        -> Result<pe_clip_models::prediction::Prediction, pe_clip_models::Error>,
) -> anyhow::Result<u8> {
    use super::table;
    use std::io::Write;

    let clip_width = clips
        .iter()
        .map(|c| c.display().to_string().chars().count())
        .max()
        .unwrap_or(0);
    let mut out = std::io::stdout().lock();
    let mut header_written = json;
    let mut failed = 0usize;
    for clip in clips {
        match predict(clip) {
            Ok(r) => {
                if json {
                    writeln!(out, "{}", serde_json::to_string(&r)?)?;
                } else {
                    if !header_written {
                        writeln!(out, "{}", table::header(names, clip_width))?;
                        header_written = true;
                    }
                    writeln!(
                        out,
                        "{}",
                        table::row(&r.clip, &r.label, &r.probs, names, clip_width)
                    )?;
                }
            }
            Err(e) => {
                failed += 1;
                let msg = e.to_string();
                let path = clip.display().to_string();
                if msg.starts_with(&path) {
                    eprintln!("error: {msg}");
                } else {
                    eprintln!("error: {path}: {msg}");
                }
            }
        }
    }
    Ok(match failed {
        0 => super::EXIT_OK,
        n if n == clips.len() => super::EXIT_FAILURE,
        _ => super::EXIT_PARTIAL,
    })
}

#[cfg(not(feature = "train"))]
pub fn run(_args: Args) -> anyhow::Result<u8> {
    Err(super::built_without_train("zero-shot"))
}

/// The candle device named on the command line.
#[cfg(feature = "train")]
pub(crate) fn device_from_name(name: &str) -> anyhow::Result<candle_core::Device> {
    let ordinal = match name {
        "cpu" => return Ok(candle_core::Device::Cpu),
        "cuda" => 0,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => anyhow::bail!("unknown device {other:?} (expected cpu, cuda or cuda:N)"),
        },
    };
    #[cfg(feature = "cuda")]
    {
        Ok(candle_core::Device::new_cuda(ordinal)?)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ordinal;
        anyhow::bail!("{name}: this binary was built without the `cuda` feature")
    }
}

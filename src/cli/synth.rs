//! `pe-clip synth`: write a synthetic face-clip dataset in DFEW's layout.

use std::path::PathBuf;

/// Arguments of `pe-clip synth`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output directory (DFEW layout: `Clip/clip_224x224/`, `EmoLabel_DataSplit/`).
    #[arg(long)]
    out: PathBuf,
    /// Training clips (classes balanced).
    #[arg(long, default_value_t = 700)]
    train: usize,
    /// Test clips, from identities disjoint from the training ones.
    #[arg(long, default_value_t = 350)]
    test: usize,
    /// Seed (the same seed writes the same dataset).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Frame size in pixels (square).
    #[arg(long, default_value_t = 112)]
    size: u32,
    /// Fewest frames per clip.
    #[arg(long, default_value_t = 24)]
    min_frames: usize,
    /// Most frames per clip.
    #[arg(long, default_value_t = 48)]
    max_frames: usize,
    /// Near-infrared grayscale look (in-cabin IR cameras).
    #[arg(long)]
    ir: bool,
    /// No blinks, speech or brief other expressions.
    #[arg(long)]
    no_distractors: bool,
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    use pe_clip_models::synth::{write_dataset, DatasetOptions, SynthOptions};
    if args.min_frames == 0 || args.max_frames < args.min_frames {
        anyhow::bail!("--min-frames must be at least 1 and at most --max-frames");
    }
    if args.size < 16 {
        anyhow::bail!("--size must be at least 16 pixels");
    }
    let opts = DatasetOptions {
        train: args.train,
        test: args.test,
        seed: args.seed,
        size: args.size,
        clip: SynthOptions {
            min_frames: args.min_frames,
            max_frames: args.max_frames,
            infrared: args.ir,
            distractors: !args.no_distractors,
        },
    };
    let r = write_dataset(&args.out, &opts)?;
    println!(
        "{}: {} train + {} test clips ({} + {} identities), {} frames in {:.1} s ({:.1} clips/s)",
        args.out.display(),
        r.train_clips,
        r.test_clips,
        r.train_identities,
        r.test_identities,
        r.frames,
        r.seconds,
        r.clips_per_second
    );
    Ok(super::EXIT_OK)
}

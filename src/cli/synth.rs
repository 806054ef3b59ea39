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
    /// Instead of a dataset: one person's clips, `OUT/<class>/<class>-NN.y4m` (the layout
    /// `pe-clip calibrate` reads), e.g. a driver to fit a profile for.
    #[arg(long)]
    person: bool,
    /// With --person: move the resting face, e.g. `droopy` or
    /// `brow-lowerer=0.45,lip-corner-depressor=0.5` (AU names or au4, values 0..1 added).
    #[arg(long, value_name = "SHIFT", requires = "person")]
    shift: Option<String>,
    /// With --person: clips of each class.
    #[arg(long, value_name = "N", default_value_t = 3, requires = "person")]
    clips_per_class: usize,
    /// With --person: the classes (comma-separated names; default all).
    #[arg(long, value_name = "LIST", requires = "person")]
    classes: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    use pe_clip_models::synth::{write_dataset, DatasetOptions, SynthOptions};
    if args.min_frames == 0 || args.max_frames < args.min_frames {
        anyhow::bail!("--min-frames must be at least 1 and at most --max-frames");
    }
    if args.size < 16 {
        anyhow::bail!("--size must be at least 16 pixels");
    }
    let clip = SynthOptions {
        min_frames: args.min_frames,
        max_frames: args.max_frames,
        infrared: args.ir,
        distractors: !args.no_distractors,
    };
    if args.person {
        use pe_clip_models::synth::{parse_shift, write_person, PersonOptions, CLASS_NAMES};
        let shift = match &args.shift {
            Some(s) => parse_shift(s).map_err(|e| anyhow::anyhow!("--shift: {e}"))?,
            None => [0.0; 13],
        };
        let classes = match &args.classes {
            None => (0..CLASS_NAMES.len()).collect(),
            Some(list) => list
                .split(',')
                .map(|c| {
                    CLASS_NAMES
                        .iter()
                        .position(|n| *n == c.trim())
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "--classes: {c:?} is not one of {}",
                                CLASS_NAMES.join(", ")
                            )
                        })
                })
                .collect::<anyhow::Result<Vec<usize>>>()?,
        };
        let written = write_person(
            &args.out,
            &PersonOptions {
                seed: args.seed,
                size: args.size,
                clip,
                shift,
                clips_per_class: args.clips_per_class,
                classes,
            },
        )?;
        println!(
            "{}: {} clips of one person",
            args.out.display(),
            written.len()
        );
        return Ok(super::EXIT_OK);
    }
    let opts = DatasetOptions {
        train: args.train,
        test: args.test,
        seed: args.seed,
        size: args.size,
        clip,
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

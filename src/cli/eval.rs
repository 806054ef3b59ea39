//! `pe-clip eval`: UAR, WAR, per-class recall and the confusion matrix of a run on a dataset split.

use std::path::PathBuf;

/// Arguments of `pe-clip eval`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A run directory.
    #[arg(long, value_name = "RUN_DIR")]
    checkpoint: PathBuf,
    /// Dataset root (DFEW, FERV39K or a manifest; see docs/training.md).
    #[arg(long)]
    data: PathBuf,
    /// Which split: train or test.
    #[arg(long, default_value = "test")]
    split: String,
    /// DFEW fold (1..5).
    #[arg(long, default_value_t = 1)]
    fold: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Write the confusion matrix as an SVG image.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Compute device: cpu, or cuda (needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The dtype the frozen backbone computes in: f32, bf16 or f16 (the adapters, LayerNorm,
    /// softmax and the logits stay f32).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    precision: String,
}

#[cfg(feature = "train")]
pub fn run(args: Args) -> anyhow::Result<u8> {
    crate::cli::keep_large_allocations();
    use anyhow::Context;
    use pe_clip_models::dataset::{self, Split};
    use pe_clip_models::metrics::Confusion;
    use pe_clip_models::peclip::{load_run, GruMode};
    use pe_clip_models::prediction::argmax;
    use pe_clip_models::sampling::NUM_SEGMENTS;
    use pe_clip_models::video::load_sampled_clip;
    use pe_clip_models::zero_shot::{l2_normalize, pixels_of};

    let split: Split = args.split.parse().map_err(anyhow::Error::msg)?;
    let device = super::zero_shot::device_from_name(&args.device)?;
    let (model, run) = load_run(&args.checkpoint, &device).context("cannot load the run")?;
    let precision: pe_clip_models::train::Precision = args.precision.parse()?;
    let model = model.with_compute_dtype(precision.dtype())?;
    let data = dataset::load(&args.data, split, args.fold, &model.classes)?;
    let text = l2_normalize(&model.text_features()?)?;
    let mut confusion = Confusion::new(model.classes.len());
    let mut failed = 0usize;
    let t = std::time::Instant::now();
    for sample in &data.samples {
        let result = (|| -> anyhow::Result<usize> {
            let clip = load_sampled_clip(&sample.clip, NUM_SEGMENTS)?;
            let pixels = pixels_of(&clip, &run.preprocess, &device)?.unsqueeze(0)?;
            let logits = model
                .forward_with_text(&pixels, GruMode::PerVideo, &text)?
                .squeeze(0)?
                .to_vec1::<f32>()?;
            Ok(argmax(&logits))
        })();
        match result {
            Ok(pred) => confusion.add(sample.label, pred),
            Err(e) => {
                failed += 1;
                eprintln!("error: {}: {e:#}", sample.clip.display());
            }
        }
    }
    log::info!(
        "{} clips in {:.1} s",
        data.samples.len(),
        t.elapsed().as_secs_f64()
    );
    let m = confusion.metrics();
    let names = model.classes.names();
    if let Some(path) = &args.plot {
        let title = format!(
            "{} on {} ({})",
            args.checkpoint.display(),
            args.data.display(),
            split.name()
        );
        pe_clip_models::io::write_atomic(
            path,
            pe_clip_models::report::confusion_svg(&m, &names, &title).as_bytes(),
        )?;
    }
    if args.json {
        let mut v = serde_json::to_value(&m)?;
        v["classes"] = serde_json::json!(names);
        v["failed"] = failed.into();
        println!("{v}");
    } else {
        print_metrics(&m, &names, failed);
    }
    Ok(if failed == 0 {
        super::EXIT_OK
    } else if failed == data.samples.len() {
        super::EXIT_FAILURE
    } else {
        super::EXIT_PARTIAL
    })
}

/// UAR, WAR and the confusion matrix with per-class recall, as a table.
#[cfg(feature = "train")]
fn print_metrics(m: &pe_clip_models::metrics::Metrics, names: &[&str], failed: usize) {
    println!(
        "UAR {:.2} %  WAR {:.2} %  ({} clips, {failed} failed)",
        100.0 * m.uar,
        100.0 * m.war,
        m.samples
    );
    let w = names.iter().map(|n| n.len()).max().unwrap_or(6).max(6);
    let first = w.max("true \\ pred".len());
    print!("{:>first$} |", "true \\ pred");
    for n in names {
        print!(" {n:>w$}");
    }
    println!(" | recall");
    for (i, row) in m.confusion.iter().enumerate() {
        print!("{:>first$} |", names[i]);
        for c in row {
            print!(" {c:>w$}");
        }
        match m.per_class_recall[i] {
            Some(r) => println!(" | {:.1} %", 100.0 * r),
            None => println!(" | -"),
        }
    }
}

#[cfg(not(feature = "train"))]
pub fn run(_args: Args) -> anyhow::Result<u8> {
    Err(super::built_without_train("eval"))
}

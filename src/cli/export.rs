//! `pe-clip export`: a trained run directory to a model package (`model.onnx` + `manifest.json`),
//! f32 or int8 with calibration.

use std::path::PathBuf;

/// Arguments of `pe-clip export`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The run directory (from `pe-clip train` or `pe-clip import-reference`).
    #[arg(value_name = "RUN_DIR")]
    run: PathBuf,
    /// The package directory to write (replaced if it holds a package).
    #[arg(short, long, value_name = "PACKAGE_DIR")]
    out: PathBuf,
    /// The step model's arithmetic: f32, f16 (linear layers in f16: for the GPU and Armv8.2
    /// FP16 cores) or int8 (needs --calib).
    #[arg(long, default_value = "f32", value_parser = ["f32", "f16", "int8"])]
    precision: String,
    /// Shorthand for --precision int8.
    #[arg(long)]
    int8: bool,
    /// Calibration clips: a dataset (its train split) or a folder of clips (frame folders or
    /// .y4m files), ideally from the camera the package will run on.
    #[arg(long, value_name = "DATA_OR_CLIPS")]
    calib: Option<PathBuf>,
    /// Calibration clips used (spread evenly over the set).
    #[arg(long, default_value_t = 32)]
    calib_clips: usize,
    /// Held-out clips for the int8-vs-f32 check: a dataset (its test split, labels give UAR) or a
    /// folder of clips.
    #[arg(long, value_name = "DATA_OR_CLIPS")]
    check: Option<PathBuf>,
    /// Held-out clips checked (spread evenly over the set).
    #[arg(long, default_value_t = 140)]
    check_clips: usize,
    /// DFEW fold of --calib / --check datasets.
    #[arg(long, default_value_t = 1)]
    fold: usize,
    /// Activation observer: minmax, mse or percentile:P (e.g. percentile:99.99).
    #[arg(long, default_value = "mse")]
    observer: String,
    /// SmoothQuant strength folded into the LayerNorms before quantizing (0 turns it off).
    #[arg(long, default_value_t = 0.5)]
    smooth_alpha: f32,
    /// One weight scale per output column instead of one per weight tensor (more precise
    /// weights; slower in tract, which does not fuse the per-column rescale).
    #[arg(long)]
    per_channel: bool,
    /// Also quantize the adapters' projections (ShA up, TDA input and up).
    #[arg(long)]
    quantize_adapters: bool,
    /// Sampled frames per prediction.
    #[arg(long, default_value_t = pe_clip_models::sampling::NUM_SEGMENTS)]
    window: usize,
    /// Camera frames between sampled frames (default: from the calibration clips' lengths).
    #[arg(long)]
    stride: Option<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[cfg(feature = "train")]
fn collect_clips(
    root: &std::path::Path,
    split: pe_clip_models::dataset::Split,
    fold: usize,
    classes: &pe_clip_models::ClassSet,
    limit: usize,
) -> anyhow::Result<(Vec<crate::frames::clips::LabelledClip>, String)> {
    use crate::frames::clips::LabelledClip;
    use anyhow::Context;
    use pe_clip_models::dataset;
    let mut clips: Vec<LabelledClip> = match dataset::detect_layout(root) {
        Ok(_) => LabelledClip::from_dataset(root, split, fold, classes)?,
        Err(_) if root.is_dir() => {
            let mut v: Vec<PathBuf> = std::fs::read_dir(root)
                .with_context(|| format!("cannot list {}", root.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| pe_clip_models::video::is_clip_path(p))
                .collect();
            v.sort();
            v.into_iter()
                .map(|path| LabelledClip { path, label: None })
                .collect()
        }
        Err(e) => return Err(e.into()),
    };
    if clips.is_empty() {
        anyhow::bail!("{}: no clips found", root.display());
    }
    if limit > 0 && clips.len() > limit {
        let n = clips.len();
        clips = (0..limit).map(|i| clips[i * n / limit].clone()).collect();
    }
    let source = format!("{} ({})", root.display(), split.name());
    Ok((clips, source))
}

#[cfg(feature = "train")]
pub fn run(args: Args) -> anyhow::Result<u8> {
    use crate::export::{export, ExportOptions, Int8Options};
    use anyhow::{bail, Context};
    use pe_clip_calibrate::ObserverKind;
    use pe_clip_models::dataset::Split;
    use pe_clip_models::peclip::load_run;

    let observer: ObserverKind = args.observer.parse()?;
    let (int8_wanted, f16) = match (args.precision.as_str(), args.int8) {
        ("f16", true) => bail!("--int8 and --precision f16 exclude each other"),
        ("int8", _) | (_, true) => (true, false),
        ("f16", false) => (false, true),
        _ => (false, false),
    };
    let args = Args {
        int8: int8_wanted,
        ..args
    };
    if !(0.0..=1.0).contains(&args.smooth_alpha) {
        bail!("--smooth-alpha must be in 0..1");
    }
    if args.int8 && args.calib.is_none() {
        bail!(
            "--int8 needs calibration clips: --calib DATA_OR_CLIPS (a dataset, or a folder of a \
             few dozen clips from the target camera; `pe-clip synth` makes synthetic ones)"
        );
    }
    let device = candle_core::Device::Cpu;
    let (model, run) = load_run(&args.run, &device).context("cannot load the run")?;
    let int8 = match (&args.calib, args.int8) {
        (Some(root), true) => {
            let (calib, calib_source) = collect_clips(
                root,
                Split::Train,
                args.fold,
                &model.classes,
                args.calib_clips,
            )?;
            Some(Int8Options {
                observer,
                smooth_alpha: (args.smooth_alpha > 0.0).then_some(args.smooth_alpha),
                per_channel: args.per_channel,
                quantize_adapters: args.quantize_adapters,
                calib,
                calib_source,
            })
        }
        _ => None,
    };
    let (check, check_source) = match &args.check {
        Some(root) if args.int8 || f16 => collect_clips(
            root,
            Split::Test,
            args.fold,
            &model.classes,
            args.check_clips,
        )?,
        Some(_) => {
            log::warn!("--check compares int8 or f16 with f32; ignored for an f32 export");
            (Vec::new(), String::new())
        }
        None => (Vec::new(), String::new()),
    };
    let opts = ExportOptions {
        int8,
        f16,
        check,
        check_source,
        window: args.window,
        stride: args.stride,
        face_crop: "the clip's frames as given (DFEW-style face crops)".into(),
    };
    let report = export(
        &model,
        &run.preprocess,
        provenance(&args.run)?,
        &args.out,
        &opts,
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(super::EXIT_OK)
}

/// Where the package comes from: the run directory, its trainables' digest and configuration,
/// and this build.
#[cfg(feature = "train")]
fn provenance(run: &std::path::Path) -> anyhow::Result<crate::package::Provenance> {
    use anyhow::Context;
    use pe_clip_models::peclip::checkpoint::{RUN_CONFIG_FILE, TRAINABLES_FILE};

    let config_path = run.join(RUN_CONFIG_FILE);
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&config_path).with_context(|| config_path.display().to_string())?,
    )
    .with_context(|| config_path.display().to_string())?;
    Ok(crate::package::Provenance {
        checkpoint: std::path::absolute(run)?.display().to_string(),
        checkpoint_sha256: crate::package::sha256_file(&run.join(TRAINABLES_FILE))?,
        config,
        source_revision: env!("PE_CLIP_SOURCE_REVISION").to_string(),
        pe_clip_version: env!("CARGO_PKG_VERSION").to_string(),
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    })
}

/// The human report: sizes, MatMuls per block before and after folding, the int8 recipe and
/// its fidelity.
#[cfg(feature = "train")]
fn print_report(report: &crate::export::ExportReport) {
    println!(
        "{}: {} package, model.onnx {:.2} MB (f32 {:.2} MB), {:.1} s",
        report.package.display(),
        report.precision,
        report.model_bytes as f64 / 1e6,
        report.f32_model_bytes as f64 / 1e6,
        report.seconds
    );
    let before: Vec<String> = report
        .matmuls
        .iter()
        .map(|m| m.unfolded.to_string())
        .collect();
    let after: Vec<String> = report
        .matmuls
        .iter()
        .map(|m| m.folded.to_string())
        .collect();
    println!(
        "MatMuls per block: {} before folding, {} after",
        before.join(" "),
        after.join(" ")
    );
    let Some(q) = &report.quantization else {
        return;
    };
    println!(
        "int8: {} of {} linear layers, observer {}, smoothing {}, {} weight scales; \
         calibrated on {} clips / {} frames",
        q.quantized_layers,
        q.linear_layers,
        q.observer,
        q.smooth_alpha
            .map_or("off".to_string(), |a| format!("alpha {a}")),
        if q.per_channel {
            "per-column"
        } else {
            "per-tensor"
        },
        q.calibration.clips,
        q.calibration.frames
    );
    if let Some(f) = &q.fidelity {
        let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.2} %", v * 100.0));
        println!(
            "int8 vs f32 on {} held-out clips: top-1 agreement {:.2} %, logit cosine mean \
             {:.5} (min {:.5}), UAR f32 {} int8 {}",
            f.clips,
            f.top1_agreement * 100.0,
            f.logit_cosine_mean,
            f.logit_cosine_min,
            pct(f.uar_f32),
            pct(f.uar_reduced)
        );
    }
}

#[cfg(not(feature = "train"))]
pub fn run(_args: Args) -> anyhow::Result<u8> {
    Err(super::built_without_train("export"))
}

//! `pe-clip bench`: device and host timings as JSON or a line of text.

/// Arguments of `pe-clip bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, clap::Subcommand)]
enum What {
    /// Training steps per second and peak memory (one 16-frame clip per step, random weights).
    Train(TrainArgs),
    /// Per-frame step latency of model packages in tract, at each thread count.
    Step(StepArgs),
    /// Time of `pe-clip calibrate` (ranges) on a few clips against running the same clips.
    Calibrate(CalibrateArgs),
    /// UAR of synthetic drivers with a shifted resting face, without and with a driver profile.
    Driver(DriverArgs),
}

#[derive(Debug, clap::Args)]
struct CalibrateArgs {
    /// An int8 package (it is copied; the original is not changed). Default: the demo package.
    #[arg(long, value_name = "DIR")]
    package: Option<std::path::PathBuf>,
    /// Clips to calibrate on (default: generated synthetic clips in the near-infrared look).
    #[arg(long, value_name = "DIR")]
    clips: Option<std::path::PathBuf>,
    /// Generated clips and their frames.
    #[arg(long, default_value_t = 5)]
    count: usize,
    #[arg(long, default_value_t = 16)]
    frames: usize,
    /// Repetitions (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// How the inputs are observed (auto, int8, f32), as `pe-clip calibrate --observe`.
    #[arg(long, default_value = "auto")]
    observe: String,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct DriverArgs {
    /// A package with a neutral reference. Default: the demo package.
    #[arg(long, value_name = "DIR")]
    package: Option<std::path::PathBuf>,
    /// The drivers' resting-face shift (`pe-clip synth --shift`); `none` for unshifted drivers.
    #[arg(long, default_value = "droopy")]
    shift: String,
    #[arg(long, default_value_t = 10)]
    drivers: usize,
    /// Neutral clips each profile is fitted from.
    #[arg(long, default_value_t = 1)]
    neutral_clips: usize,
    /// Clips of every other class also given to the fit.
    #[arg(long, default_value_t = 0)]
    labelled_clips: usize,
    /// Held-out clips per class per driver.
    #[arg(long, default_value_t = 5)]
    test_clips: usize,
    #[arg(long, default_value_t = 1000)]
    seed: u64,
    #[arg(long)]
    ir: bool,
    #[command(flatten)]
    fit: super::calibrate::FitArgs,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long)]
    json: bool,
}

fn package_or_demo(dir: &Option<std::path::PathBuf>) -> anyhow::Result<crate::package::Package> {
    Ok(match dir {
        Some(d) => crate::package::Package::open(d)?,
        None => crate::package::Package::embedded_demo()?,
    })
}

/// Copy a package's manifest and files into `to`.
fn copy_package(p: &crate::package::Package, to: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    std::fs::write(
        to.join(crate::package::MANIFEST_FILE),
        serde_json::to_vec_pretty(&p.manifest)?,
    )?;
    std::fs::write(to.join(&p.manifest.model), p.model_bytes()?)?;
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn run_calibrate(a: CalibrateArgs) -> anyhow::Result<u8> {
    use crate::calibration::{self, RangeOptions};
    use crate::runtime::roi::RoiPolicy;
    crate::engine::set_threads(a.threads);
    let source = package_or_demo(&a.package)?;
    let tmp = tempfile::tempdir()?;
    let clips_dir = match &a.clips {
        Some(d) => d.clone(),
        None => {
            use pe_clip_models::synth::{write_dataset, DatasetOptions, SynthOptions};
            let d = tmp.path().join("data");
            write_dataset(
                &d,
                &DatasetOptions {
                    train: 0,
                    test: a.count,
                    seed: 77,
                    size: source.manifest.preprocess.image_size as u32,
                    clip: SynthOptions {
                        min_frames: a.frames,
                        max_frames: a.frames,
                        infrared: true,
                        distractors: true,
                    },
                },
            )?;
            d.join("Clip").join("clip_224x224")
        }
    };
    let pkg_dir = tmp.path().join("package");
    copy_package(&source, &pkg_dir)?;
    let mut run_s = Vec::new();
    let mut cal_s = Vec::new();
    let mut last = None;
    for _ in 0..a.repeat.max(1) {
        // Running the clips: open the package, load the model and the clips, step every frame.
        let t = std::time::Instant::now();
        let p = crate::package::Package::open(&pkg_dir)?;
        let found = calibration::discover_clips(&clips_dir, &p.class_names())?;
        let loaded =
            calibration::load_clips(&p, &found, p.manifest.temporal.window, RoiPolicy::Full)?;
        let mut step = p.step_model()?;
        for c in &loaded.clips {
            let mut state = step.zero_state();
            for f in &c.frames {
                std::hint::black_box(step.step(f, &mut state)?);
            }
        }
        run_s.push(t.elapsed().as_secs_f64());
        // Calibrating them (and writing the package; each round rolls back first).
        let t = std::time::Instant::now();
        let r = calibration::recalibrate(
            &pkg_dir,
            &clips_dir,
            &RangeOptions {
                observer: None,
                roi: RoiPolicy::Full,
                check: None,
                check_f32: None,
                observe: a.observe.parse()?,
            },
        )?;
        cal_s.push(t.elapsed().as_secs_f64());
        calibration::rollback(&pkg_dir)?;
        last = Some(r);
    }
    let r = last.expect("at least one round");
    let (run, cal) = (median(run_s), median(cal_s));
    let out = serde_json::json!({
        "package": source.dir.display().to_string(),
        "clips": r.recalibration.clips,
        "frames": r.recalibration.frames,
        "passes": r.recalibration.passes,
        "threads": a.threads,
        "run_seconds": run,
        "calibrate_seconds": cal,
        "ratio": cal / run,
        "calibrate_parts": r.seconds,
    });
    if a.json {
        println!("{out}");
    } else {
        println!(
            "{}: {} clips, {} frames: running {:.3} s, calibrating {:.3} s (observed through {}: \
             {:.3} s, rewriting {:.3} s, writing {:.3} s): {:.2}x",
            source.dir.display(),
            r.recalibration.clips,
            r.recalibration.frames,
            run,
            cal,
            r.recalibration.passes.join(" then "),
            r.seconds.observe,
            r.seconds.rewrite,
            r.seconds.write,
            cal / run
        );
    }
    Ok(super::EXIT_OK)
}

fn run_driver(a: DriverArgs) -> anyhow::Result<u8> {
    use crate::calibration::{evaluate_profiles, DriverEvalOptions};
    crate::engine::set_threads(a.threads);
    let package = package_or_demo(&a.package)?;
    let shift = if a.shift == "none" {
        [0.0; 13]
    } else {
        pe_clip_models::synth::parse_shift(&a.shift).map_err(|e| anyhow::anyhow!("--shift: {e}"))?
    };
    let tmp = tempfile::tempdir()?;
    let r = evaluate_profiles(
        &package,
        tmp.path(),
        &DriverEvalOptions {
            shift,
            drivers: a.drivers,
            neutral_clips: a.neutral_clips,
            labelled_clips: a.labelled_clips,
            test_clips: a.test_clips,
            seed: a.seed,
            infrared: a.ir,
            shrinkage: a.fit.shrinkage,
            bias_l2: a.fit.bias(),
        },
    )?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        for d in &r.drivers {
            println!(
                "driver seed {}: UAR {:.1} % -> {:.1} %, neutral recall {:.0} % -> {:.0} %",
                d.seed,
                100.0 * d.uar_before,
                100.0 * d.uar_after,
                100.0 * d.neutral_recall_before,
                100.0 * d.neutral_recall_after
            );
        }
        println!(
            "shift {}: {} drivers, {} held-out clips each: mean UAR {:.1} % -> {:.1} % ({:+.1} points) in {:.1} s",
            a.shift,
            r.drivers.len(),
            r.test_clips_per_driver,
            100.0 * r.uar_before,
            100.0 * r.uar_after,
            100.0 * (r.uar_after - r.uar_before),
            r.seconds
        );
    }
    Ok(super::EXIT_OK)
}

#[derive(Debug, clap::Args)]
struct StepArgs {
    /// A package to time (repeatable).
    #[arg(long = "package", value_name = "PACKAGE_DIR")]
    packages: Vec<std::path::PathBuf>,
    /// Instead: export this shape (tiny, vit-b16, vit-b32) with random weights as f32 and as int8
    /// (calibrated on generated synthetic clips) and time both.
    #[arg(long, conflicts_with = "packages")]
    arch: Option<String>,
    /// With --arch: write the two packages here (default: a temporary directory).
    #[arg(long, requires = "arch")]
    keep: Option<std::path::PathBuf>,
    /// With --arch: int8 export options as `pe-clip export` takes them.
    #[arg(long, default_value_t = 0.5)]
    smooth_alpha: f32,
    #[arg(long)]
    per_channel: bool,
    /// Timed steps per package and thread count (after 3 warm-up steps).
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Also print where the time of one step goes, per operator (1 thread).
    #[arg(long)]
    profile: bool,
    /// Thread counts for tract's matmuls.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Latency of one package at one thread count.
#[derive(Debug, Clone, serde::Serialize)]
struct StepTiming {
    package: String,
    precision: String,
    model_bytes: u64,
    threads: usize,
    steps: usize,
    median_ms: f64,
    p90_ms: f64,
    min_ms: f64,
}

/// A package, its step model with tract on `threads` threads, and a fixed test frame.
fn load_for_timing(
    dir: &std::path::Path,
    threads: usize,
) -> anyhow::Result<(crate::package::Package, crate::engine::StepModel, Vec<u8>)> {
    crate::engine::set_threads(threads);
    let pkg = crate::package::Package::open(dir)?;
    let model = pkg.step_model()?;
    let s = model.image_size();
    let frame = (0..s * s * 3)
        .map(|i| ((i * 37 + i / 7) % 251) as u8)
        .collect();
    Ok((pkg, model, frame))
}

fn time_package(dir: &std::path::Path, threads: usize, steps: usize) -> anyhow::Result<StepTiming> {
    let (pkg, mut model, frame) = load_for_timing(dir, threads)?;
    let mut state = model.zero_state();
    for _ in 0..3 {
        model.step(&frame, &mut state)?;
    }
    let mut ms = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t = std::time::Instant::now();
        model.step(&frame, &mut state)?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    let bytes = std::fs::metadata(pkg.model_path())?.len();
    Ok(StepTiming {
        package: dir.display().to_string(),
        precision: pkg.manifest.precision.clone(),
        model_bytes: bytes,
        threads,
        steps,
        median_ms: ms[ms.len() / 2],
        p90_ms: ms[(ms.len() * 9 / 10).min(ms.len() - 1)],
        min_ms: ms[0],
    })
}

fn run_step(a: StepArgs) -> anyhow::Result<u8> {
    if a.steps == 0 || a.threads.contains(&0) {
        anyhow::bail!("--steps and --threads must be at least 1");
    }
    let _tmp;
    let packages = match &a.arch {
        Some(arch) => {
            let dir = match &a.keep {
                Some(d) => d.clone(),
                None => {
                    _tmp = tempfile::tempdir()?;
                    _tmp.path().to_path_buf()
                }
            };
            export_random(arch, &dir, a.smooth_alpha, a.per_channel)?
        }
        None if a.packages.is_empty() => anyhow::bail!("give --package DIR or --arch ARCH"),
        None => a.packages.clone(),
    };
    if a.profile {
        for p in &packages {
            let (pkg, mut model, frame) = load_for_timing(p, 1)?;
            let mut state = model.zero_state();
            model.step(&frame, &mut state)?;
            let ops = model.profile_step(&frame, &mut state)?;
            let total: f64 = ops.iter().map(|o| o.1).sum();
            eprintln!(
                "{} ({}): {total:.1} ms per step by operator",
                p.display(),
                pkg.manifest.precision
            );
            for (op, ms) in ops.iter().take(12) {
                eprintln!("  {ms:8.2} ms  {:5.1} %  {op}", 100.0 * ms / total);
            }
        }
    }
    let mut rows = Vec::new();
    for p in &packages {
        for &t in &a.threads {
            let r = time_package(p, t, a.steps)?;
            if !a.json {
                println!(
                    "{} ({}, {:.1} MB): {} thread(s): median {:.2} ms, p90 {:.2} ms, min {:.2} ms",
                    r.package,
                    r.precision,
                    r.model_bytes as f64 / 1e6,
                    r.threads,
                    r.median_ms,
                    r.p90_ms,
                    r.min_ms
                );
            }
            rows.push(r);
        }
    }
    // With one f32 and one int8 package: the ratios the export targets.
    let f32_rows: Vec<&StepTiming> = rows.iter().filter(|r| r.precision == "f32").collect();
    let int8_rows: Vec<&StepTiming> = rows.iter().filter(|r| r.precision == "int8").collect();
    let mut ratios = Vec::new();
    if let (Some(f), Some(q)) = (f32_rows.first(), int8_rows.first()) {
        let size = q.model_bytes as f64 / f.model_bytes as f64;
        let speed: Vec<(usize, f64)> = a
            .threads
            .iter()
            .filter_map(|&t| {
                let f = f32_rows.iter().find(|r| r.threads == t)?;
                let q = int8_rows.iter().find(|r| r.threads == t)?;
                Some((t, f.median_ms / q.median_ms))
            })
            .collect();
        if !a.json {
            let sp: Vec<String> = speed
                .iter()
                .map(|(t, x)| format!("{x:.2}x at {t} thread(s)"))
                .collect();
            println!(
                "int8 / f32 size {:.1} %; int8 speed-up {}",
                size * 100.0,
                sp.join(", ")
            );
        }
        ratios.push(serde_json::json!({"int8_over_f32_size": size, "int8_speedup": speed}));
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({"bench": "step", "arch": a.arch, "timings": rows, "ratios": ratios})
        );
    }
    Ok(super::EXIT_OK)
}

/// Export a random-weight PE-CLIP of `arch` as `dir/f32` and `dir/int8`.
#[cfg(feature = "train")]
fn export_random(
    arch: &str,
    dir: &std::path::Path,
    smooth_alpha: f32,
    per_channel: bool,
) -> anyhow::Result<Vec<std::path::PathBuf>> {
    use crate::export::{export, ExportOptions, Int8Options, LabelledClip};
    use crate::package::{sha256_hex, Provenance};
    use candle_core::Device;
    use pe_clip_calibrate::ObserverKind;
    use pe_clip_models::clip::random::write_random_model;
    use pe_clip_models::clip::{Arch, ClipConfig, ClipModel};
    use pe_clip_models::dataset::Split;
    use pe_clip_models::peclip::{trainable_specs, PeClip, PeClipConfig, Trainables};
    use pe_clip_models::synth::{write_dataset, DatasetOptions, SynthOptions};
    use pe_clip_models::tokenizer::ClipTokenizer;
    use pe_clip_models::{ClassSet, PixelNorm, PreprocessSpec};

    let arch_v: Arch = arch.parse().map_err(anyhow::Error::msg)?;
    let cfg = ClipConfig::preset(arch_v);
    let t = std::time::Instant::now();
    let wdir = tempfile::tempdir()?;
    write_random_model(wdir.path(), &cfg, 0)?;
    let clip = ClipModel::load(wdir.path(), &Device::Cpu)?;
    let peclip = PeClipConfig::default();
    let trainables =
        Trainables::init(trainable_specs(&peclip, &clip.config), 0, &Device::Cpu)?.into_inference();
    // Non-zero adapters, as after training (the up-projections start at zero).
    trainables.perturb(1, 0.02, 0.5)?;
    let tok = ClipTokenizer::from_hf_dir(wdir.path())?;
    let model = PeClip::new(peclip, clip, trainables, ClassSet::default(), &tok)?;
    let s = cfg.vision_config.image_size;
    let data = dir.join("synthetic-clips");
    write_dataset(
        &data,
        &DatasetOptions {
            train: 8,
            test: 8,
            seed: 1,
            size: s as u32,
            clip: SynthOptions::default(),
        },
    )?;
    let clips = |split| LabelledClip::from_dataset(&data, split, 1, &ClassSet::default());
    log::info!(
        "random {arch} model and clips ready in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let spec = PreprocessSpec {
        image_size: s,
        pixel_norm: PixelNorm::None,
    };
    let provenance = Provenance {
        checkpoint: format!("random {arch} weights (seed 0)"),
        checkpoint_sha256: sha256_hex(arch.as_bytes()),
        config: serde_json::to_value(&model.config)?,
        source_revision: env!("PE_CLIP_SOURCE_REVISION").to_string(),
        pe_clip_version: env!("CARGO_PKG_VERSION").to_string(),
        created_unix: 0,
    };
    let mut out = Vec::new();
    for int8 in [false, true] {
        let opts = ExportOptions {
            int8: int8.then(|| Int8Options {
                observer: ObserverKind::Mse,
                smooth_alpha: (smooth_alpha > 0.0).then_some(smooth_alpha),
                per_channel,
                quantize_adapters: false,
                calib: clips(Split::Train).unwrap_or_default(),
                calib_source: "synthetic clips".into(),
            }),
            check: if int8 {
                clips(Split::Test)?
            } else {
                Vec::new()
            },
            check_source: "synthetic clips".into(),
            window: 16,
            stride: Some(1),
            face_crop: "none".into(),
        };
        let p = dir.join(if int8 { "int8" } else { "f32" });
        let t = std::time::Instant::now();
        let r = export(&model, &spec, provenance.clone(), &p, &opts)?;
        log::info!(
            "exported {} in {:.1} s",
            p.display(),
            t.elapsed().as_secs_f64()
        );
        if let Some(f) = r.quantization.as_ref().and_then(|q| q.fidelity.as_ref()) {
            log::info!(
                "int8 vs f32 on {} clips: agreement {:.3}, logit cosine mean {:.5} min {:.5}",
                f.clips,
                f.top1_agreement,
                f.logit_cosine_mean,
                f.logit_cosine_min
            );
        }
        out.push(p);
    }
    Ok(out)
}

#[cfg(not(feature = "train"))]
fn export_random(
    _arch: &str,
    _dir: &std::path::Path,
    _smooth_alpha: f32,
    _per_channel: bool,
) -> anyhow::Result<Vec<std::path::PathBuf>> {
    Err(super::built_without_train("bench step --arch"))
}

#[derive(Debug, clap::Args)]
struct TrainArgs {
    /// Backbone shape: tiny, vit-b16 or vit-b32.
    #[arg(long, default_value = "tiny")]
    arch: String,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Clips per step.
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Peak resident memory of this process in bytes (Linux `VmHWM`), if known.
#[cfg(feature = "train")]
pub(crate) fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    match args.what {
        What::Train(a) => run_train(a),
        What::Step(a) => run_step(a),
        What::Calibrate(a) => run_calibrate(a),
        What::Driver(a) => run_driver(a),
    }
}

#[cfg(feature = "train")]
fn run_train(a: TrainArgs) -> anyhow::Result<u8> {
    use candle_core::{Device, Tensor};
    use pe_clip_models::clip::random::write_random_model;
    use pe_clip_models::clip::{Arch, ClipConfig, ClipModel};
    use pe_clip_models::peclip::{trainable_specs, PeClip, PeClipConfig, Trainables};
    use pe_clip_models::rng::SeededRng;
    use pe_clip_models::tokenizer::ClipTokenizer;
    use pe_clip_models::train::{train_step, Optimizers};
    use pe_clip_models::ClassSet;

    if a.steps == 0 || a.batch_size == 0 {
        anyhow::bail!("--steps and --batch-size must be at least 1");
    }
    let arch: Arch = a.arch.parse().map_err(anyhow::Error::msg)?;
    let cfg = ClipConfig::preset(arch);
    let dir = tempfile::tempdir()?;
    write_random_model(dir.path(), &cfg, 0)?;
    let clip = ClipModel::load(dir.path(), &Device::Cpu)?;
    let peclip = PeClipConfig::default();
    let trainables = Trainables::init(trainable_specs(&peclip, &clip.config), 0, &Device::Cpu)?;
    let tok = ClipTokenizer::from_hf_dir(dir.path())?;
    let model = PeClip::new(peclip, clip, trainables, ClassSet::default(), &tok)?;
    let mut opt = Optimizers::new(&model, 2e-4, 3e-5)?;
    let s = cfg.vision_config.image_size;
    let mut rng = SeededRng::new(1);
    let n = a.batch_size * 16 * 3 * s * s;
    let videos = Tensor::from_vec(
        (0..n).map(|_| rng.uniform() as f32).collect::<Vec<f32>>(),
        (a.batch_size, 16, 3, s, s),
        &Device::Cpu,
    )?;
    let labels: Vec<u32> = (0..a.batch_size as u32).map(|i| i % 7).collect();
    train_step(&model, &mut opt, &videos, &labels, None)?; // warm-up
    let t = std::time::Instant::now();
    for _ in 0..a.steps {
        train_step(&model, &mut opt, &videos, &labels, None)?;
    }
    let secs = t.elapsed().as_secs_f64();
    let steps_per_s = a.steps as f64 / secs;
    let peak = peak_rss_bytes();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "bench": "train", "arch": a.arch, "clips_per_step": a.batch_size,
                "frames_per_clip": 16, "steps": a.steps, "seconds": secs,
                "steps_per_second": steps_per_s, "peak_rss_bytes": peak,
                "threads": rayon::current_num_threads(),
            })
        );
    } else {
        println!(
            "train {}: {:.3} steps/s ({:.2} s/step, {} clip(s) x 16 frames), peak RSS {}",
            a.arch,
            steps_per_s,
            secs / a.steps as f64,
            a.batch_size,
            peak.map_or("unknown".into(), |b| format!("{:.2} GB", b as f64 / 1e9))
        );
    }
    Ok(super::EXIT_OK)
}

#[cfg(not(feature = "train"))]
fn run_train(_a: TrainArgs) -> anyhow::Result<u8> {
    Err(super::built_without_train("bench train"))
}

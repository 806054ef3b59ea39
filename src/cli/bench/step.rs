//! `pe-clip bench step`: per-frame step latency of model packages in tract.

#[derive(Debug, clap::Args)]
pub(super) struct StepArgs {
    /// A package to time (repeatable; `demo`: the built-in one).
    #[arg(long = "package", value_name = "PACKAGE_DIR")]
    packages: Vec<std::path::PathBuf>,
    /// Instead: export this shape (tiny, vit-b16, vit-b32) with random weights as f32 and as int8
    /// (calibrated on generated synthetic clips) and time both.
    #[arg(long, conflicts_with = "packages")]
    arch: Option<String>,
    /// With --arch: the precisions to export and time.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "f32,int8",
        requires = "arch"
    )]
    precisions: Vec<String>,
    /// With --arch: write the packages here (default: a temporary directory).
    #[arg(long, requires = "arch")]
    keep: Option<std::path::PathBuf>,
    /// With --arch: int8 export options as `pe-clip export` takes them.
    #[arg(long, default_value_t = 0.5)]
    smooth_alpha: f32,
    #[arg(long)]
    per_channel: bool,
    /// Timed steps per package and thread count (after 3 warm-up steps), one step of each
    /// package in turn so that the machine's drift slows them alike.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Also print where the time of one step goes, per operator (at each thread count).
    #[arg(long)]
    profile: bool,
    /// Thread counts for tract's matmuls.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Time each int8 package once per form of its int8 products (native, fused, i32, f32,
    /// dequantized: as `PE_CLIP_INT8_MATMUL` names them), steps interleaved with the others',
    /// to see in one run which form is fastest on this CPU. Default: the form this CPU picks.
    #[arg(long, value_delimiter = ',')]
    int8_forms: Vec<crate::engine::Int8Form>,
    /// Where the steps run: cpu, gpu or auto (as `pe-clip run --device`).
    #[arg(long, default_value = "cpu")]
    device: crate::engine::Device,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Latency of one package at one thread count.
#[derive(Debug, Clone, serde::Serialize)]
pub(super) struct StepTiming {
    package: String,
    precision: String,
    /// The form of an int8 package's products (`native`, `fused`, ...).
    int8_form: Option<String>,
    model_bytes: u64,
    threads: usize,
    steps: usize,
    median_ms: f64,
    p90_ms: f64,
    min_ms: f64,
}

/// One thing to time: a package, and for an int8 one the form of its products (`None`: this
/// CPU's).
type Unit = (std::path::PathBuf, Option<crate::engine::Int8Form>);

/// The units of `dirs`: each int8 package once per form of `forms` (if any), the others once.
fn units(
    dirs: &[std::path::PathBuf],
    forms: &[crate::engine::Int8Form],
) -> anyhow::Result<Vec<Unit>> {
    let mut out = Vec::new();
    for dir in dirs {
        let int8 = crate::package::Package::open_or_demo(dir)?
            .manifest
            .precision
            .to_string()
            == "int8";
        match int8 && !forms.is_empty() {
            true => out.extend(forms.iter().map(|&f| (dir.clone(), Some(f)))),
            false => out.push((dir.clone(), None)),
        }
    }
    Ok(out)
}

/// A package, its step model with tract on `threads` threads (int8 products in `form`), and a
/// fixed test frame.
fn load_for_timing(
    (dir, form): &Unit,
    threads: usize,
    device: crate::engine::Device,
) -> anyhow::Result<(crate::package::Package, crate::engine::StepModel, Vec<u8>)> {
    crate::engine::set_threads(threads);
    let pkg = crate::package::Package::open_or_demo(dir)?;
    let model = pkg.step_model_in(device, *form)?;
    let s = model.image_size();
    let frame = (0..s * s * 3)
        .map(|i| ((i * 37 + i / 7) % 251) as u8)
        .collect();
    Ok((pkg, model, frame))
}

/// Time the packages in `dirs` at `threads`, their steps interleaved (one step of each in turn),
/// so that a machine whose speed drifts during the run slows them alike and their ratios hold.
fn time_packages(
    dirs: &[Unit],
    threads: usize,
    steps: usize,
    device: crate::engine::Device,
) -> anyhow::Result<Vec<StepTiming>> {
    let mut loaded = Vec::with_capacity(dirs.len());
    for dir in dirs {
        let (pkg, mut model, frame) = load_for_timing(dir, threads, device)?;
        let mut state = model.zero_state();
        for _ in 0..3 {
            model.step(&frame, &mut state)?;
        }
        loaded.push((pkg, model, frame, state, Vec::with_capacity(steps)));
    }
    for _ in 0..steps {
        for (_, model, frame, state, ms) in loaded.iter_mut() {
            let t = std::time::Instant::now();
            model.step(frame, state)?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let mut rows = Vec::with_capacity(dirs.len());
    for ((dir, form), (pkg, _, _, _, mut ms)) in dirs.iter().zip(loaded) {
        ms.sort_by(f64::total_cmp);
        let precision = pkg.manifest.precision.to_string();
        let int8_form = (precision == "int8" && device != crate::engine::Device::Gpu).then(|| {
            form.unwrap_or_else(crate::engine::Int8Form::for_this_cpu)
                .to_string()
        });
        rows.push(StepTiming {
            package: dir.display().to_string(),
            precision,
            int8_form,
            model_bytes: match pkg.is_embedded() {
                true => pkg.model_bytes()?.len() as u64,
                false => std::fs::metadata(pkg.model_path())?.len(),
            },
            threads,
            steps,
            median_ms: ms[ms.len() / 2],
            p90_ms: ms[(ms.len() * 9 / 10).min(ms.len() - 1)],
            min_ms: ms[0],
        });
    }
    Ok(rows)
}

pub(super) fn run_step(a: StepArgs) -> anyhow::Result<u8> {
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
            export_random(arch, &dir, a.smooth_alpha, a.per_channel, &a.precisions)?
        }
        None if a.packages.is_empty() => anyhow::bail!("give --package DIR or --arch ARCH"),
        None => a.packages.clone(),
    };
    let packages = units(&packages, &a.int8_forms)?;
    if a.profile {
        for (&t, p) in a
            .threads
            .iter()
            .flat_map(|t| packages.iter().map(move |p| (t, p)))
        {
            let (pkg, mut model, frame) = load_for_timing(p, t, a.device.resolve("bench step")?)?;
            let mut state = model.zero_state();
            model.step(&frame, &mut state)?;
            let ops = model.profile_step(&frame, &mut state)?;
            let total: f64 = ops.iter().map(|o| o.1).sum();
            let form = p.1.map(|f| format!(", int8 form {f}")).unwrap_or_default();
            eprintln!(
                "{} ({}{form}), {t} thread(s): {total:.1} ms per step by operator",
                p.0.display(),
                pkg.manifest.precision
            );
            for (op, ms) in ops.iter().take(12) {
                eprintln!("  {ms:8.2} ms  {:5.1} %  {op}", 100.0 * ms / total);
            }
        }
    }
    let machine = crate::engine::machine();
    let device = a.device.resolve("bench step")?;
    if !a.json {
        println!("machine: {machine}; device {device:?}");
    }
    let mut rows = Vec::new();
    for &t in &a.threads {
        for r in time_packages(&packages, t, a.steps, device)? {
            if !a.json {
                let form = match &r.int8_form {
                    Some(f) => format!(", {f}"),
                    None => String::new(),
                };
                println!(
                    "{} ({}{form}, {:.1} MB): {} thread(s): median {:.2} ms, p90 {:.2} ms, min {:.2} ms",
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
    // With an f32 package and an int8 or f16 one: size and speed against f32.
    let f32_rows: Vec<&StepTiming> = rows.iter().filter(|r| r.precision == "f32").collect();
    let mut ratios = Vec::new();
    for reduced in ["int8", "f16"] {
        let q_rows: Vec<&StepTiming> = rows.iter().filter(|r| r.precision == reduced).collect();
        let (Some(f), Some(q)) = (f32_rows.first(), q_rows.first()) else {
            continue;
        };
        let size = q.model_bytes as f64 / f.model_bytes as f64;
        let speed: Vec<(usize, f64)> = a
            .threads
            .iter()
            .filter_map(|&t| {
                let f = f32_rows.iter().find(|r| r.threads == t)?;
                let q = q_rows.iter().find(|r| r.threads == t)?;
                Some((t, f.median_ms / q.median_ms))
            })
            .collect();
        if !a.json {
            let sp: Vec<String> = speed
                .iter()
                .map(|(t, x)| format!("{x:.2}x at {t} thread(s)"))
                .collect();
            println!(
                "{reduced} / f32 size {:.1} %; {reduced} speed-up {}",
                size * 100.0,
                sp.join(", ")
            );
        }
        ratios.push(serde_json::json!({
            "precision": reduced,
            "over_f32_size": size,
            "speedup": speed,
        }));
    }
    // With several int8 forms: each one's step time against the first's, per package.
    if a.int8_forms.len() > 1 {
        let first = a.int8_forms[0].to_string();
        for later in &a.int8_forms[1..] {
            let later = later.to_string();
            for &t in &a.threads {
                for base in rows
                    .iter()
                    .filter(|r| r.threads == t && r.int8_form.as_deref() == Some(first.as_str()))
                {
                    let Some(other) = rows.iter().find(|r| {
                        r.threads == t
                            && r.package == base.package
                            && r.int8_form.as_deref() == Some(later.as_str())
                    }) else {
                        continue;
                    };
                    let x = other.median_ms / base.median_ms;
                    if !a.json {
                        println!(
                            "{}: int8 {later} / {first} step time {x:.2} at {t} thread(s)",
                            base.package
                        );
                    }
                    ratios.push(serde_json::json!({
                        "package": base.package, "threads": t,
                        "int8_form": later, "over_int8_form": first, "step_time_ratio": x,
                    }));
                }
            }
        }
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({"bench": "step", "arch": a.arch, "machine": machine, "device": format!("{device:?}"), "timings": rows, "ratios": ratios})
        );
    }
    Ok(crate::cli::EXIT_OK)
}

/// Export a random-weight PE-CLIP of `arch` as `dir/f32` and `dir/int8`.
#[cfg(feature = "train")]
fn export_random(
    arch: &str,
    dir: &std::path::Path,
    smooth_alpha: f32,
    per_channel: bool,
    precisions: &[String],
) -> anyhow::Result<Vec<std::path::PathBuf>> {
    use crate::export::{ExportOptions, Int8Options};
    use crate::frames::clips::LabelledClip;
    use crate::package::{sha256_hex, Provenance};
    use pe_clip_calibrate::ObserverKind;
    use pe_clip_models::clip::{Arch, ClipConfig};
    use pe_clip_models::dataset::Split;
    use pe_clip_models::peclip::random::{random_peclip, Perturb, RandomPeClip};
    use pe_clip_models::peclip::PeClipConfig;
    use pe_clip_models::synth::{write_dataset, DatasetOptions, SynthOptions};
    use pe_clip_models::{ClassSet, PixelNorm, PreprocessSpec};

    let arch_v: Arch = arch.parse().map_err(anyhow::Error::msg)?;
    let cfg = ClipConfig::preset(arch_v);
    let t = std::time::Instant::now();
    let wdir = tempfile::tempdir()?;
    let model = random_peclip(
        wdir.path(),
        &RandomPeClip {
            backbone: cfg.clone(),
            config: PeClipConfig::default(),
            seed: 0,
            inference: true,
            perturb: Some(Perturb {
                seed: 1,
                std: 0.02,
                scale_bias: 0.5,
            }),
        },
    )?;
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
    let calib = clips(Split::Train).unwrap_or_default();
    let check = clips(Split::Test)?;
    let mut out = Vec::new();
    for precision in precisions {
        let (int8, f16) = match precision.as_str() {
            "f32" => (false, false),
            "f16" => (false, true),
            "int8" => (true, false),
            other => anyhow::bail!("--precisions: {other:?} is not f32, f16 or int8"),
        };
        let opts = ExportOptions {
            f16,
            int8: int8.then(|| Int8Options {
                observer: ObserverKind::Mse,
                smooth_alpha: (smooth_alpha > 0.0).then_some(smooth_alpha),
                per_channel,
                quantize_adapters: false,
                calib: calib.clone(),
                calib_source: "synthetic clips".into(),
            }),
            check: if int8 || f16 {
                check.clone()
            } else {
                Vec::new()
            },
            check_source: "synthetic clips".into(),
            window: 16,
            stride: Some(1),
            face_crop: "none".into(),
        };
        let p = dir.join(precision);
        export_logged(&model, &spec, &provenance, &p, &opts)?;
        out.push(p);
    }
    Ok(out)
}

/// `export`, logging the time it took and the int8 fidelity.
#[cfg(feature = "train")]
fn export_logged(
    model: &pe_clip_models::peclip::PeClip,
    spec: &pe_clip_models::PreprocessSpec,
    provenance: &crate::package::Provenance,
    p: &std::path::Path,
    opts: &crate::export::ExportOptions,
) -> anyhow::Result<()> {
    let t = std::time::Instant::now();
    let r = crate::export::export(model, spec, provenance.clone(), p, opts)?;
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
    Ok(())
}

#[cfg(not(feature = "train"))]
fn export_random(
    _arch: &str,
    _dir: &std::path::Path,
    _smooth_alpha: f32,
    _per_channel: bool,
    _precisions: &[String],
) -> anyhow::Result<Vec<std::path::PathBuf>> {
    Err(crate::cli::built_without_train("bench step --arch"))
}

//! `pe-clip bench calibrate`: on-device range re-calibration against running the same clips.

use std::path::{Path, PathBuf};

use super::{copy_package, median, package_or_demo};

#[derive(Debug, clap::Args)]
pub(super) struct CalibrateArgs {
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

pub(super) fn run_calibrate(a: CalibrateArgs) -> anyhow::Result<u8> {
    use crate::calibration::{self, RangeOptions};
    use crate::frames::roi::RoiPolicy;
    crate::engine::set_threads(a.threads);
    let source = package_or_demo(&a.package)?;
    let tmp = tempfile::tempdir()?;
    let clips_dir = match &a.clips {
        Some(d) => d.clone(),
        None => night_clips(
            &tmp.path().join("data"),
            &a,
            source.manifest.preprocess.image_size,
        )?,
    };
    let pkg_dir = tmp.path().join("package");
    copy_package(&source, &pkg_dir)?;
    let mut run_s = Vec::new();
    let mut cal_s = Vec::new();
    let mut last = None;
    for _ in 0..a.repeat.max(1) {
        // Running the clips: open the package, load the model and the clips, step every frame.
        let t = std::time::Instant::now();
        run_clips(&pkg_dir, &clips_dir)?;
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
        crate::package::rollback(&pkg_dir)?;
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
    Ok(crate::cli::EXIT_OK)
}

/// `a.count` synthetic infrared clips of `a.frames` frames under `data`; returns their folder.
fn night_clips(data: &Path, a: &CalibrateArgs, size: usize) -> anyhow::Result<PathBuf> {
    use pe_clip_models::synth::{write_dataset, DatasetOptions, SynthOptions};
    write_dataset(
        data,
        &DatasetOptions {
            train: 0,
            test: a.count,
            seed: 77,
            size: size as u32,
            clip: SynthOptions {
                min_frames: a.frames,
                max_frames: a.frames,
                infrared: true,
                distractors: true,
            },
        },
    )?;
    Ok(data.join("Clip").join("clip_224x224"))
}

/// What running the clips costs: open the package, load its model and the clips, step every
/// frame of every clip.
fn run_clips(pkg_dir: &Path, clips_dir: &Path) -> anyhow::Result<()> {
    use crate::frames::roi::RoiPolicy;
    let p = crate::package::Package::open(pkg_dir)?;
    let found = crate::frames::clips::discover(clips_dir, &p.class_names())?;
    let loaded = crate::frames::clips::load_clips(
        &p.preprocess_spec(),
        &found,
        p.manifest.temporal.window,
        RoiPolicy::Full,
    )?;
    let mut step = p.step_model()?;
    for c in &loaded.clips {
        let mut state = step.zero_state();
        for f in &c.frames {
            std::hint::black_box(step.step(f, &mut state)?);
        }
    }
    Ok(())
}

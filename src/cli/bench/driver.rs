//! `pe-clip bench driver`: UAR of synthetic drivers without and with a driver profile.

use super::package_or_demo;

#[derive(Debug, clap::Args)]
pub(super) struct DriverArgs {
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
    fit: crate::cli::calibrate::FitArgs,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long)]
    json: bool,
}

pub(super) fn run_driver(a: DriverArgs) -> anyhow::Result<u8> {
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
    Ok(crate::cli::EXIT_OK)
}

// The benchmark itself: the same clip loading, model and fit as `pe-clip calibrate --driver`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use pe_clip_calibrate::profile::{self, ClipFeatures, FitOptions};
use pe_clip_models::synth::ClipSpec;
use serde::Serialize;

use crate::calibration::labelled_features;
use crate::error::{Error, Result};
use crate::frames::clips::{load_clips, LabelledClip};
use crate::frames::roi::RoiPolicy;
use crate::package::{Head, Package};

/// How [`evaluate_profiles`] builds its synthetic drivers.
#[derive(Debug, Clone)]
pub struct DriverEvalOptions {
    /// Resting-face shift of every driver (`pe_clip_models::synth::parse_shift`).
    pub shift: [f32; 13],
    pub drivers: usize,
    /// Neutral clips each profile is fitted from.
    pub neutral_clips: usize,
    /// Clips of each other class also given to the fit (0: neutral only).
    pub labelled_clips: usize,
    /// Held-out clips per class each driver is scored on.
    pub test_clips: usize,
    pub seed: u64,
    pub infrared: bool,
    pub shrinkage: f32,
    pub bias_l2: Option<f32>,
}

/// One synthetic driver's UAR on their held-out clips, without and with their profile.
#[derive(Debug, Clone, Serialize)]
pub struct DriverScore {
    pub seed: u64,
    pub uar_before: f64,
    pub uar_after: f64,
    /// Held-out neutral clips recognised as neutral, without and with.
    pub neutral_recall_before: f64,
    pub neutral_recall_after: f64,
}

/// Mean UAR over drivers without and with profiles.
#[derive(Debug, Clone, Serialize)]
pub struct DriverEval {
    pub drivers: Vec<DriverScore>,
    pub uar_before: f64,
    pub uar_after: f64,
    pub test_clips_per_driver: usize,
    pub seconds: f64,
}

/// Synthetic drivers with a shifted resting face: fit each one's profile from a few of their
/// clips (through the same loading, model and fit as `pe-clip calibrate --driver`) and score
/// UAR on other clips of theirs, without and with the profile. Clips are written as `.y4m`
/// under `work`.
pub fn evaluate_profiles(
    package: &Package,
    work: &Path,
    opts: &DriverEvalOptions,
) -> Result<DriverEval> {
    use pe_clip_models::synth::write_clips;
    let t0 = Instant::now();
    let neutral = package.neutral_class()?;
    let reference = package
        .manifest
        .neutral_reference
        .clone()
        .ok_or_else(|| Error::package(&package.dir, "has no neutral reference"))?;
    let classes = package.class_names();
    let synth_names = pe_clip_models::synth::CLASS_NAMES;
    if classes
        .iter()
        .map(String::as_str)
        .ne(synth_names.iter().copied())
    {
        return Err(Error::package(
            &package.dir,
            format!("classes {classes:?} are not the synthetic generator's {synth_names:?}"),
        ));
    }
    let window = package.manifest.temporal.window;
    let size = package.manifest.preprocess.image_size as u32;
    let head = &package.manifest.head;
    let mut step = package.step_model()?;
    let mut scores = Vec::new();
    for d in 0..opts.drivers {
        let seed = opts.seed + d as u64;
        let (train, test) = driver_clips(opts, seed, size, neutral, classes.len());
        let dir = work.join(format!("driver-{seed}"));
        let _ = std::fs::remove_dir_all(&dir);
        let to_local = |v: Vec<(PathBuf, usize)>| -> Vec<LabelledClip> {
            v.into_iter()
                .map(|(path, l)| LabelledClip {
                    path,
                    label: Some(l),
                })
                .collect()
        };
        let train = to_local(write_clips(&dir.join("fit"), &train, size)?);
        let test = to_local(write_clips(&dir.join("test"), &test, size)?);
        let spec = package.preprocess_spec();
        let fit_clips = load_clips(&spec, &train, window, RoiPolicy::Full)?;
        let test_clips = load_clips(&spec, &test, window, RoiPolicy::Full)?;
        let feats = labelled_features(&mut step, &fit_clips.clips)?;
        let corr = profile::fit(
            &feats,
            &reference.feature,
            &head.text_features,
            head.logit_scale,
            &FitOptions {
                shrinkage: opts.shrinkage,
                bias_l2: opts.bias_l2,
                neutral,
            },
        )
        .map_err(|e| Error::calibrate("driver profile fit", e))?;
        let none = profile::Correction::none(head.feature_dim, classes.len());
        let held = labelled_features(&mut step, &test_clips.clips)?;
        let score = |c: &profile::Correction| held_out_score(c, head, &held, neutral);
        let (ub, nb) = score(&none);
        let (ua, na) = score(&corr);
        let _ = std::fs::remove_dir_all(&dir);
        scores.push(DriverScore {
            seed,
            uar_before: ub,
            uar_after: ua,
            neutral_recall_before: nb,
            neutral_recall_after: na,
        });
    }
    let n = scores.len().max(1) as f64;
    Ok(DriverEval {
        uar_before: scores.iter().map(|s| s.uar_before).sum::<f64>() / n,
        uar_after: scores.iter().map(|s| s.uar_after).sum::<f64>() / n,
        test_clips_per_driver: opts.test_clips * classes.len(),
        drivers: scores,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// One synthetic driver's clips: for each class, the fitting clips (`neutral_clips` neutral,
/// `labelled_clips` of each other class), then `test_clips` held out.
fn driver_clips(
    opts: &DriverEvalOptions,
    seed: u64,
    size: u32,
    neutral: usize,
    classes: usize,
) -> (Vec<ClipSpec>, Vec<ClipSpec>) {
    use pe_clip_models::synth::{person_clips, PersonOptions, SynthOptions};
    let n_train = opts.neutral_clips.max(opts.labelled_clips);
    let per = n_train + opts.test_clips;
    let (_, specs) = person_clips(&PersonOptions {
        seed,
        size,
        clip: SynthOptions {
            infrared: opts.infrared,
            ..SynthOptions::default()
        },
        shift: opts.shift,
        clips_per_class: per,
        classes: (0..classes).collect(),
    });
    let mut train = Vec::new();
    let mut test = Vec::new();
    for (k, spec) in specs.into_iter().enumerate() {
        let i = k % per;
        let wanted = if spec.label == neutral {
            opts.neutral_clips
        } else {
            opts.labelled_clips
        };
        if i < n_train {
            if i < wanted {
                train.push(spec);
            }
        } else {
            test.push(spec);
        }
    }
    (train, test)
}

/// UAR and neutral recall of the head corrected by `c` on the held-out clips.
fn held_out_score(
    c: &profile::Correction,
    head: &Head,
    held: &[ClipFeatures],
    neutral: usize,
) -> (f64, f64) {
    let mut m = pe_clip_models::metrics::Confusion::new(head.text_features.len());
    for f in held {
        let l = c.logits(&head.text_features, head.logit_scale, &f.sum, f.frames);
        m.add(f.label, pe_clip_models::prediction::argmax(&l));
    }
    let metrics = m.metrics();
    (
        metrics.uar,
        metrics.per_class_recall[neutral].unwrap_or(0.0),
    )
}

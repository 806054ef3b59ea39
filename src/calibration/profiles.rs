//! Driver profiles: a small regularised correction of the video head fitted to one driver's
//! labelled clips (method: `pe_clip_calibrate::profile`), stored in the package's `drivers/` and
//! applied by `pe-clip run --driver`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use pe_clip_calibrate::profile::{
    self, ClipFeatures, DriverProfile, FitOptions, FitSummary, PROFILE_FORMAT, PROFILE_VERSION,
};
use serde::Serialize;

use super::{l2, now_unix};
use crate::engine::StepModel;
use crate::error::{Error, Result};
use crate::frames::clips::{discover, load_clips, Loaded, LoadedClip};
use crate::frames::roi::RoiPolicy;
use crate::package::{Package, DRIVERS_DIR, NEUTRAL};

/// A valid profile name: 1 to 64 letters, digits, `-` or `_`.
pub fn check_profile_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::usage(format!(
            "driver name {name:?}: use 1 to 64 letters, digits, '-' or '_'"
        )))
    }
}

/// Where the profile `name` of the package at `dir` lives.
pub fn profile_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(DRIVERS_DIR).join(format!("{name}.json"))
}

/// How `fit_driver` runs.
#[derive(Debug, Clone)]
pub struct DriverOptions {
    pub name: String,
    pub roi: RoiPolicy,
    pub shrinkage: f32,
    /// `None`: never fit a class bias.
    pub bias_l2: Option<f32>,
}

/// What `fit_driver` did.
#[derive(Debug, Clone, Serialize)]
pub struct DriverReport {
    pub profile: PathBuf,
    pub name: String,
    pub method: String,
    pub fit: FitSummary,
    /// |δ|, and for scale |μ₀| (the neutral reference).
    pub offset_norm: f64,
    pub reference_norm: f64,
    pub skipped: Vec<String>,
    pub seconds: f64,
}

/// The features of the labelled ones of `clips` through `step` (unlabelled clips are left out).
pub fn labelled_features(step: &mut StepModel, clips: &[LoadedClip]) -> Result<Vec<ClipFeatures>> {
    clips
        .iter()
        .filter_map(|c| c.clip.label.map(|l| (l, c)))
        .map(|(label, c)| {
            Ok(ClipFeatures::of_frames(
                label,
                &crate::frames::clip_features(step, &c.frames)?,
            ))
        })
        .collect()
}

/// Fit the profile of driver `opts.name` from the labelled clips under `clips_dir` (at least one
/// neutral) and write it to the package's `drivers/` (atomically; an existing profile of that
/// name is replaced only when the fit succeeds).
pub fn fit_driver(dir: &Path, clips_dir: &Path, opts: &DriverOptions) -> Result<DriverReport> {
    let t0 = Instant::now();
    check_profile_name(&opts.name)?;
    let package = Package::open(dir)?;
    let neutral = package.neutral_class()?;
    let reference = package.manifest.neutral_reference.clone().ok_or_else(|| {
        Error::package(
            dir,
            "has no neutral reference (the population's resting face), which driver profiles \
             are measured from: add one with `pe-clip calibrate --package DIR --reference DATA` \
             (labelled clips of many people) or export with labelled calibration clips",
        )
    })?;
    let classes = package.class_names();
    let loaded = load_driver_clips(&package, clips_dir, opts.roi, neutral)?;
    let mut step = package.step_model()?;
    let feats = labelled_features(&mut step, &loaded.clips)?;
    let head = &package.manifest.head;
    let fit_opts = FitOptions {
        shrinkage: opts.shrinkage,
        bias_l2: opts.bias_l2,
        neutral,
    };
    let corr = profile::fit(
        &feats,
        &reference.feature,
        &head.text_features,
        head.logit_scale,
        &fit_opts,
    )
    .map_err(|e| Error::calibrate(clips_dir.display().to_string(), e))?;
    let none = profile::Correction::none(head.feature_dim, classes.len());
    let before = profile::accuracy(&feats, &none, &head.text_features, head.logit_scale);
    let after = profile::accuracy(&feats, &corr, &head.text_features, head.logit_scale);
    let method = if corr.bias_fitted {
        "neutral-offset+bias"
    } else {
        "neutral-offset"
    };
    let profile = DriverProfile {
        format: PROFILE_FORMAT.into(),
        version: PROFILE_VERSION,
        name: opts.name.clone(),
        model: package.model_binding(),
        method: method.into(),
        offset: corr.offset.clone(),
        bias: corr.bias.clone(),
        fit: FitSummary {
            clips: clips_per_class(&classes, &feats),
            frames: loaded.frames(),
            shrinkage: opts.shrinkage,
            bias_l2: corr.bias_fitted.then_some(opts.bias_l2).flatten(),
            fit_accuracy_before: before,
            fit_accuracy_after: after,
            source: clips_dir.display().to_string(),
            created_unix: now_unix(),
        },
    };
    profile
        .validate(&package.model_binding())
        .map_err(|e| Error::calibrate("the fitted profile is unusable", e))?;
    let path = profile_path(dir, &opts.name);
    let drivers = dir.join(DRIVERS_DIR);
    std::fs::create_dir_all(&drivers).map_err(|e| Error::io(&drivers, e))?;
    let json = serde_json::to_vec_pretty(&profile).expect("profile serialises");
    pe_clip_models::io::write_atomic(&path, &json)?;
    Ok(DriverReport {
        profile: path,
        name: opts.name.clone(),
        method: method.into(),
        fit: profile.fit.clone(),
        offset_norm: l2(&corr.offset),
        reference_norm: l2(&reference.feature),
        skipped: loaded.skipped_text(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// A driver's labelled clips under `clips_dir`: every clip must carry a class, and at least
/// one readable clip must be neutral.
fn load_driver_clips(
    package: &Package,
    clips_dir: &Path,
    roi: RoiPolicy,
    neutral: usize,
) -> Result<Loaded> {
    let classes = package.class_names();
    let found = discover(clips_dir, &classes)?;
    if let Some(c) = found.iter().find(|c| c.label.is_none()) {
        return Err(Error::invalid(
            &c.path,
            format!(
                "no class label; put each clip in a folder named after its class ({}) or start \
             its name with the class (neutral-1.y4m)",
                classes.join(", ")
            ),
        ));
    }
    let loaded = load_clips(
        &package.preprocess_spec(),
        &found,
        package.manifest.temporal.window,
        roi,
    )?;
    if !loaded.clips.iter().any(|c| c.clip.label == Some(neutral)) {
        return Err(Error::invalid(
            clips_dir,
            format!(
                "no readable clip labelled {NEUTRAL} ({} readable clip(s){}); a driver profile \
             needs at least one",
                loaded.clips.len(),
                if loaded.skipped.is_empty() {
                    String::new()
                } else {
                    format!("; unreadable: {}", loaded.skipped_text().join("; "))
                }
            ),
        ));
    }
    Ok(loaded)
}

/// (class, clips) for every class the fitting clips have.
fn clips_per_class(classes: &[String], feats: &[ClipFeatures]) -> Vec<(String, usize)> {
    let mut per_class = vec![0usize; classes.len()];
    for f in feats {
        per_class[f.label] += 1;
    }
    classes
        .iter()
        .zip(&per_class)
        .filter(|(_, n)| **n > 0)
        .map(|(c, n)| (c.clone(), *n))
        .collect()
}

/// Read and check a driver profile for `package`: `name` is a profile of the package
/// (`drivers/NAME.json`) or, with a `/` or a `.json` ending, a file.
pub fn load_profile(package: &Package, name: &str) -> Result<DriverProfile> {
    let path = if name.contains('/') || name.ends_with(".json") {
        PathBuf::from(name)
    } else {
        check_profile_name(name)?;
        if package.is_embedded() {
            return Err(Error::usage(format!(
                "--driver {name}: the built-in demo package has no driver profiles; copy it \
                 (cp -r models/demo my-package), fit one with `pe-clip calibrate --package \
                 my-package --driver {name} --clips DIR` and run with --package my-package"
            )));
        }
        profile_path(&package.dir, name)
    };
    let text = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let profile: DriverProfile = serde_json::from_slice(&text)
        .map_err(|e| Error::invalid(&path, format!("not a driver profile: {e}")))?;
    profile
        .validate(&package.model_binding())
        .map_err(|e| Error::calibrate(path.display().to_string(), e))?;
    Ok(profile)
}

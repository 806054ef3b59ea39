//! The population's neutral reference: the resting face of many people in feature space, the
//! point a driver profile measures one driver's resting face from.

use std::path::{Path, PathBuf};
use std::time::Instant;

use pe_clip_calibrate::profile;
use serde::Serialize;

use super::l2;
use crate::engine::StepModel;
use crate::error::{Error, Result};
use crate::frames::clips::{discover, load_clips, LabelledClip, LoadedClip};
use crate::frames::roi::RoiPolicy;
use crate::package::{NeutralReference, Package, MODEL_FILE, NEUTRAL};

/// What `set_reference` did.
#[derive(Debug, Clone, Serialize)]
pub struct ReferenceReport {
    pub package: PathBuf,
    pub clips: usize,
    pub frames: usize,
    pub feature_norm: f64,
    pub skipped: Vec<String>,
    pub seconds: f64,
}

/// The population's neutral reference from neutral `clips`: the mean over clips of each clip's
/// coordinate-wise median frame feature (zero state per clip), and the frames seen.
pub fn neutral_mean(step: &mut StepModel, clips: &[LoadedClip]) -> Result<(Vec<f32>, usize)> {
    let mut sum = vec![0f64; step.feature_dim()];
    let mut n = 0usize;
    for c in clips {
        let center = profile::coordinate_median(&crate::frames::clip_features(step, &c.frames)?);
        for (s, v) in sum.iter_mut().zip(center) {
            *s += v;
        }
        n += c.frames.len();
    }
    let k = clips.len().max(1) as f64;
    Ok((sum.iter().map(|s| (s / k) as f32).collect(), n))
}

/// The neutral clips of a labelled population: the local layout (class folders or names), else
/// any dataset layout pe-clip reads (its training split).
fn population_neutral(package: &Package, data: &Path) -> Result<Vec<LabelledClip>> {
    let neutral = package.neutral_class()?;
    let classes = package.class_names();
    if data.is_dir() && pe_clip_models::dataset::detect_layout(data).is_err() {
        if let Ok(found) = discover(data, &classes) {
            let n: Vec<LabelledClip> = found
                .into_iter()
                .filter(|c| c.label == Some(neutral))
                .collect();
            if !n.is_empty() {
                return Ok(n);
            }
        }
    }
    let set = pe_clip_models::ClassSet {
        format_version: pe_clip_models::classes::CLASSES_FORMAT_VERSION,
        description: String::new(),
        classes: package
            .manifest
            .classes
            .iter()
            .map(|c| pe_clip_models::classes::ClassText {
                name: c.name.clone(),
                descriptor: c.text.clone(),
            })
            .collect(),
    };
    let ds = pe_clip_models::dataset::load(data, pe_clip_models::dataset::Split::Train, 1, &set)
        .map_err(|e| Error::invalid(data, e.to_string()))?;
    Ok(ds
        .samples
        .into_iter()
        .filter(|s| s.label == neutral)
        .map(|s| LabelledClip {
            path: s.clip,
            label: Some(neutral),
        })
        .collect())
}

/// Measure the population's neutral reference from up to `max_clips` neutral clips under `data`
/// and store it in the package (the model is unchanged; `previous/` and profiles are kept).
pub fn set_reference(
    dir: &Path,
    data: &Path,
    max_clips: usize,
    roi: RoiPolicy,
) -> Result<ReferenceReport> {
    let t0 = Instant::now();
    let package = Package::open(dir)?;
    let mut clips = population_neutral(&package, data)?;
    clips.truncate(max_clips.max(1));
    let loaded = load_clips(
        &package.preprocess_spec(),
        &clips,
        package.manifest.temporal.window,
        roi,
    )?;
    if loaded.clips.is_empty() {
        return Err(Error::invalid(
            data,
            format!("no readable clip labelled {NEUTRAL}"),
        ));
    }
    let mut step = package.step_model()?;
    let (feature, frames) = neutral_mean(&mut step, &loaded.clips)?;
    let feature_norm = l2(&feature);
    let mut manifest = package.manifest.clone();
    manifest.neutral_reference = Some(NeutralReference {
        feature,
        source: data.display().to_string(),
        clips: loaded.clips.len(),
        frames,
    });
    let bytes = package.model_bytes()?;
    crate::package::write_package_carrying_previous(dir, manifest, &[(MODEL_FILE, &bytes)])?;
    Ok(ReferenceReport {
        package: dir.to_path_buf(),
        clips: loaded.clips.len(),
        frames,
        feature_norm,
        skipped: loaded.skipped_text(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

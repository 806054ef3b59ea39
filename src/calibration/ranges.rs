//! Range re-calibration: new int8 activation ranges for this car's camera from a few local
//! clips, observed with the export's observer; each new threshold rewrites only a layer's input
//! scale, output rescale and integer bias (`pe_clip_calibrate::requant`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use pe_clip_calibrate::calibrator::{Calibrator, LayerInput};
use pe_clip_calibrate::int8::LinearRanges;
use pe_clip_calibrate::requant::SiteScales;
use pe_clip_calibrate::ObserverKind;
use pe_clip_models::metrics::AgreementTally;
use prost::Message;
use serde::Serialize;

use super::now_unix;
use crate::engine::{StepModel, TapValue};
use crate::error::{Error, Result};
use crate::frames::clip_features;
use crate::frames::clips::{discover, load_clips, Loaded, LoadedClip};
use crate::frames::roi::RoiPolicy;
use crate::onnx::{pb, QuantSite};
use crate::package::{
    write_package, Agreement, Package, Precision, Recalibration, RecalibrationCheck, MODEL_FILE,
};

/// Fewest readable clips a range re-calibration accepts.
pub const MIN_RANGE_CLIPS: usize = 3;

/// Compare `candidate` with `reference` clip by clip through the package head.
pub fn agreement(
    package: &Package,
    reference: &mut StepModel,
    candidate: &mut StepModel,
    clips: &[LoadedClip],
) -> Result<Agreement> {
    let head = &package.manifest.head;
    let mut tally = AgreementTally::default();
    for c in clips {
        let la = head.logits_of_features(
            clip_features(reference, &c.frames)?
                .iter()
                .map(Vec::as_slice),
        );
        let lb = head.logits_of_features(
            clip_features(candidate, &c.frames)?
                .iter()
                .map(Vec::as_slice),
        );
        tally.add(&la, &lb);
    }
    Ok(tally.finish())
}

/// Through which model the int8 layers' inputs are observed.
///
/// - `Int8`: the package's own int8 model, so each layer is calibrated on the inputs it will
///   see, upstream rounding included; as fast as running the clips. When the old ranges clip,
///   the layers after a clipping one see distorted inputs.
/// - `F32`: the package's int8 weights with f32 activations (what the export observed);
///   independent of the old ranges, but f32 speed (about 1.8x slower than int8 at ViT-B/16 here).
/// - `Auto` (default): `Int8`, then `F32` again if any layer's input exceeded its old range by
///   more than 1.5x (the old ranges were clipping).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Observation {
    #[default]
    Auto,
    Int8,
    F32,
}

impl std::str::FromStr for Observation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "int8" => Ok(Self::Int8),
            "f32" => Ok(Self::F32),
            other => Err(Error::usage(format!(
                "--observe {other}: expected auto, int8 or f32"
            ))),
        }
    }
}

/// `Observation::Auto` observes again with f32 activations when a layer's input exceeds its old
/// range by more than this factor.
pub const AUTO_F32_ABOVE: f32 = 1.5;

/// How `recalibrate` runs.
#[derive(Debug, Clone)]
pub struct RangeOptions {
    /// The observer; `None`: the one the package was exported with.
    pub observer: Option<ObserverKind>,
    pub observe: Observation,
    pub roi: RoiPolicy,
    /// Held-out clips to compare old and new ranges on (against the package's int8 weights with
    /// f32 activations).
    pub check: Option<PathBuf>,
    /// With `check`: compare against this f32 package of the same model instead.
    pub check_f32: Option<PathBuf>,
}

/// Seconds spent in each part.
#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    pub load_clips: f64,
    pub observe: f64,
    pub rewrite: f64,
    pub write: f64,
    pub check: f64,
    pub total: f64,
}

/// What `recalibrate` did.
#[derive(Debug, Clone, Serialize)]
pub struct RangeReport {
    pub package: PathBuf,
    pub recalibration: Recalibration,
    /// Clips that could not be read (skipped).
    pub skipped: Vec<String>,
    pub seconds: Timing,
}

/// The int8 package at `dir`, its model and the model's int8 layers.
fn int8_package(dir: &Path) -> Result<(Package, pb::ModelProto, Vec<QuantSite>)> {
    let package = Package::open(dir)?;
    if package.manifest.precision != Precision::Int8 || package.manifest.quantization.is_none() {
        return Err(Error::package(
            dir,
            format!(
                "is a {} package: only int8 packages have activation ranges to re-calibrate",
                package.manifest.precision
            ),
        ));
    }
    let bytes = package.model_bytes()?;
    let path = package.model_path();
    let proto = crate::onnx::decode(&bytes, &path.display().to_string())?;
    let sites = crate::onnx::quant_sites(&proto).map_err(|source| Error::Onnx {
        path: path.clone(),
        source,
    })?;
    if sites.is_empty() {
        return Err(Error::package(
            &path,
            "has no int8 layer written by pe-clip (nothing to re-calibrate)",
        ));
    }
    Ok((package, proto, sites))
}

/// Run `step` (a model with the sites' inputs as extra outputs) over the clips, feeding `cal`.
/// The observers run on a second thread while the model computes the next frame.
pub fn observe(step: &mut StepModel, cal: &mut Calibrator, clips: &[Vec<Vec<u8>>]) -> Result<()> {
    let names = step.extra_outputs().to_vec();
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<TapValue>>(2);
    std::thread::scope(|scope| {
        let observer = scope.spawn(|| {
            for extra in rx {
                for (name, (_, values)) in names.iter().zip(&extra) {
                    cal.observe(name, values);
                }
            }
        });
        let mut result = Ok(());
        'clips: for frames in clips {
            let mut state = step.zero_state();
            for f in frames {
                match step.step_with_extra(f, &mut state) {
                    Ok((_, extra)) => {
                        if tx.send(extra).is_err() {
                            break 'clips;
                        }
                    }
                    Err(e) => {
                        result = Err(e);
                        break 'clips;
                    }
                }
            }
        }
        drop(tx);
        observer.join().expect("the observer thread does not panic");
        result
    })
}

/// Re-estimate the int8 activation ranges of the package at `dir` from the clips under
/// `clips_dir` and replace the package (the old one is kept under `previous/`). Nothing is
/// written unless every step succeeded.
pub fn recalibrate(dir: &Path, clips_dir: &Path, opts: &RangeOptions) -> Result<RangeReport> {
    let t0 = Instant::now();
    let (package, proto, sites) = int8_package(dir)?;
    let observer = match opts.observer {
        Some(o) => o,
        None => {
            let name = &package
                .manifest
                .quantization
                .as_ref()
                .expect("int8 checked")
                .observer;
            name.parse::<ObserverKind>()
                .map_err(|e| Error::package(dir, format!("manifest observer {name:?}: {e}")))?
        }
    };
    let loaded = local_clips(&package, clips_dir, opts.roi)?;
    let t_load = t0.elapsed().as_secs_f64();
    let t = Instant::now();
    let site = Sites {
        package: &package,
        proto: &proto,
        sites: &sites,
    };
    let (ranges, passes) = site.observe_ranges(&loaded, observer, opts.observe)?;
    let t_observe = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (new_bytes, mut ratios) = site.rewrite(&ranges, clips_dir)?;
    let t_rewrite = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let check = match &opts.check {
        None => None,
        Some(held) => Some(site.check(held, opts, &new_bytes)?),
    };
    let t_check = t.elapsed().as_secs_f64();
    let t = Instant::now();
    ratios.sort_by(f64::total_cmp);
    let rec = Recalibration {
        source: clips_dir.display().to_string(),
        observer: observer.to_string(),
        passes,
        clips: loaded.clips.len(),
        frames: loaded.frames(),
        clip_list_sha256: loaded.clip_list_sha256(),
        layers: ratios.len(),
        threshold_ratio_median: ratios[ratios.len() / 2],
        threshold_ratio_min: ratios[0],
        threshold_ratio_max: ratios[ratios.len() - 1],
        previous_model_sha256: package.model_sha256().to_string(),
        check,
        created_unix: now_unix(),
    };
    let mut manifest = package.manifest.clone();
    if let Some(q) = manifest.quantization.as_mut() {
        q.recalibration = Some(rec.clone());
    }
    write_package(dir, manifest, &[(MODEL_FILE, &new_bytes)])?;
    let t_write = t.elapsed().as_secs_f64();
    Ok(RangeReport {
        package: dir.to_path_buf(),
        recalibration: rec,
        skipped: loaded.skipped_text(),
        seconds: Timing {
            load_clips: t_load,
            observe: t_observe,
            rewrite: t_rewrite,
            write: t_write,
            check: t_check,
            total: t0.elapsed().as_secs_f64(),
        },
    })
}

/// The readable clips under `clips_dir`, at least [`MIN_RANGE_CLIPS`] of them.
fn local_clips(package: &Package, clips_dir: &Path, roi: RoiPolicy) -> Result<Loaded> {
    let found = discover(clips_dir, &package.class_names())?;
    let window = package.manifest.temporal.window;
    let loaded = load_clips(&package.preprocess_spec(), &found, window, roi)?;
    if loaded.clips.len() < MIN_RANGE_CLIPS {
        return Err(Error::invalid(
            clips_dir,
            format!(
                "{} readable clip(s) of {} found; re-calibrating ranges needs at least \
             {MIN_RANGE_CLIPS}{}",
                loaded.clips.len(),
                found.len(),
                if loaded.skipped.is_empty() {
                    String::new()
                } else {
                    format!(" (unreadable: {})", loaded.skipped_text().join("; "))
                }
            ),
        ));
    }
    Ok(loaded)
}

/// An int8 package's model and its int8 layers, the phases of [`recalibrate`] over them.
struct Sites<'a> {
    package: &'a Package,
    proto: &'a pb::ModelProto,
    sites: &'a [QuantSite],
}

impl Sites<'_> {
    /// The model with every int8 layer computed in f32 from its dequantized weights.
    fn dequantized(&self) -> Result<pb::ModelProto> {
        crate::onnx::dequantized(self.proto).map_err(|source| Error::Onnx {
            path: self.package.model_path(),
            source,
        })
    }

    /// Observe every int8 layer's input on the clips (see [`Observation`]): the ranges, and the
    /// passes that were run (`int8`, `f32`).
    fn observe_ranges(
        &self,
        loaded: &Loaded,
        observer: ObserverKind,
        observe_with: Observation,
    ) -> Result<(HashMap<String, LinearRanges>, Vec<String>)> {
        let layers: Vec<LayerInput> = self
            .sites
            .iter()
            .map(|s| LayerInput {
                layer: s.name.clone(),
                input: s.input.clone(),
                in_dim: s.in_dim,
            })
            .collect();
        let frames: Vec<Vec<Vec<u8>>> = loaded.clips.iter().map(|c| c.frames.clone()).collect();
        let pass = |model: &pb::ModelProto, what: &str| -> Result<_> {
            let mut cal = Calibrator::for_layers(&layers, observer).without_channel_ranges();
            let mut tapped = model.clone();
            crate::onnx::add_outputs(&mut tapped, &cal.taps());
            let mut step = self
                .package
                .step_model_from(&tapped.encode_to_vec(), what)?;
            observe(&mut step, &mut cal, &frames)?;
            Ok(cal.ranges())
        };
        const F32_PASS: &str = "calibration taps (f32 activations)";
        if observe_with == Observation::F32 {
            return Ok((pass(&self.dequantized()?, F32_PASS)?, vec!["f32".into()]));
        }
        let ranges = pass(self.proto, "calibration taps")?;
        let widest = self
            .sites
            .iter()
            .filter_map(|s| ranges.get(&s.name).map(|r| r.input / s.scales.threshold()))
            .fold(0f32, f32::max);
        if observe_with == Observation::Auto && widest > AUTO_F32_ABOVE {
            log::info!(
                "a layer's input reaches {widest:.1}x its old range: the old ranges clip, so \
                 observing again with f32 activations"
            );
            let ranges = pass(&self.dequantized()?, F32_PASS)?;
            return Ok((ranges, vec!["int8".into(), "f32".into()]));
        }
        Ok((ranges, vec!["int8".into()]))
    }

    /// The scales of each layer for its observed range (unchanged where none usable was seen).
    fn new_scales(&self, ranges: &HashMap<String, LinearRanges>) -> Vec<Option<SiteScales>> {
        self.sites
            .iter()
            .map(|s| match ranges.get(&s.name) {
                Some(r) if r.input.is_finite() && r.input > 0.0 => {
                    Some(s.scales.with_threshold(r.input))
                }
                _ => None,
            })
            .collect()
    }

    /// The model bytes with the new constants, checked to read back with exactly them, and the
    /// new / old threshold ratio of every layer that changed.
    fn rewrite(
        &self,
        ranges: &HashMap<String, LinearRanges>,
        clips_dir: &Path,
    ) -> Result<(Vec<u8>, Vec<f64>)> {
        let scales = self.new_scales(ranges);
        let mut new = self.proto.clone();
        let mut ratios = Vec::new();
        for (s, scaled) in self.sites.iter().zip(&scales) {
            let Some(scaled) = scaled else {
                if ranges.contains_key(&s.name) {
                    log::warn!("{}: no usable range observed, kept", s.name);
                }
                continue;
            };
            crate::onnx::set_site_scales(&mut new, &s.name, scaled).map_err(|source| {
                Error::Onnx {
                    path: self.package.model_path(),
                    source,
                }
            })?;
            ratios.push(ranges[&s.name].input as f64 / s.scales.threshold() as f64);
        }
        if ratios.is_empty() {
            return Err(Error::invalid(
                clips_dir,
                "the clips gave no usable range for any int8 layer",
            ));
        }
        let new_bytes = new.encode_to_vec();
        // The graph is the one just run with taps, only constants changed: check that the bytes
        // read back with exactly the new, valid constants (`--check` also runs them).
        let what = "re-calibrated model";
        let reread = crate::onnx::decode(&new_bytes, what)
            .and_then(|m| crate::onnx::quant_sites(&m).map_err(|e| Error::engine(what, e)))?;
        let intact = reread.len() == self.sites.len()
            && reread
                .iter()
                .zip(self.sites)
                .zip(&scales)
                .all(|((a, old), new)| {
                    a.scales.is_valid() && a.scales == *new.as_ref().unwrap_or(&old.scales)
                });
        if !intact {
            return Err(Error::engine(
                what,
                "the rewritten model does not read back with its new constants; package left \
                 unchanged",
            ));
        }
        Ok((new_bytes, ratios))
    }

    /// Old and new ranges compared on the held-out clips under `held` against f32 activations
    /// (the package's int8 weights dequantized, or the f32 package `opts.check_f32` of the same
    /// run).
    fn check(
        &self,
        held: &Path,
        opts: &RangeOptions,
        new_bytes: &[u8],
    ) -> Result<RecalibrationCheck> {
        let package = self.package;
        let found = discover(held, &package.class_names())?;
        let window = package.manifest.temporal.window;
        let clips = load_clips(&package.preprocess_spec(), &found, window, opts.roi)?;
        if clips.clips.is_empty() {
            return Err(Error::invalid(held, "no readable clip to check on"));
        }
        let (mut reference, what) = match &opts.check_f32 {
            None => (
                package.step_model_from(
                    &self.dequantized()?.encode_to_vec(),
                    "f32-activation reference",
                )?,
                "the package's int8 weights with f32 activations".to_string(),
            ),
            Some(f) => {
                let f32_package = Package::open(f)?;
                if f32_package.manifest.provenance.checkpoint_sha256
                    != package.manifest.provenance.checkpoint_sha256
                {
                    return Err(Error::package(
                        f,
                        "is an export of another model (its checkpoint differs): compare with \
                         the f32 package of the same run",
                    ));
                }
                (
                    f32_package.step_model()?,
                    format!("the f32 package {}", f.display()),
                )
            }
        };
        let mut old = package.step_model()?;
        let before = agreement(package, &mut reference, &mut old, &clips.clips)?;
        let mut new_step = package.step_model_from(new_bytes, "re-calibrated model")?;
        let after = agreement(package, &mut reference, &mut new_step, &clips.clips)?;
        Ok(RecalibrationCheck {
            source: held.display().to_string(),
            reference: what,
            before,
            after,
        })
    }
}

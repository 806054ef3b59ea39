//! `pe-clip export`: a trained run to a model package (fold, ONNX step graph, optional int8 with
//! calibration, manifest).
//!
//! The int8 recipe (see `pe_clip_calibrate::graph::quantize`): every backbone linear layer (qkv,
//! attention output with the fused ShA down-projection, fc1, fc2) becomes `QuantizeLinear →
//! MatMulInteger → Add(i32 bias) → Cast → Mul(scale)` with signed int8 at zero point 0 and one
//! scale per weight tensor, the bias folded into tract's int8 matmul kernel. Per-tensor scales lose
//! accuracy where activation channels differ in range, so SmoothQuant factors measured on the
//! calibration frames first move activation range into the weights through the preceding
//! LayerNorm (exact in f32). Attention products, softmax, norms, activations, the recurrent cells
//! and residual adds stay f32.

use std::path::{Path, PathBuf};
use std::time::Instant;

use pe_clip_calibrate::calibrator::{smoothing_factors, Calibrator};
use pe_clip_calibrate::graph::Graph;
use pe_clip_calibrate::ObserverKind;
use pe_clip_models::export::{build_step_graph, BuildOptions, FoldedModel, FoldedTemporal};
use pe_clip_models::metrics::{AgreementTally, Confusion};
use pe_clip_models::peclip::{PeClip, TemporalCell};
use pe_clip_models::prediction::argmax;
use pe_clip_models::{PixelNorm, PreprocessSpec};

use crate::engine::StepModel;
use crate::error::{Error, Result};
use crate::frames::clip_features;
use crate::frames::clips::{clip_list_sha256, load_clip, load_clips, LabelledClip};
use crate::frames::roi::RoiPolicy;
use crate::package::{
    write_package, CalibrationSummary, CellKind, ClassEntry, ColorOrder, Fidelity, FrameLayout,
    Head, Manifest, NeutralReference, Precision, Preprocess, Provenance, Quantization, Resize,
    StateEntry, Temporal, MODEL_FILE, NEUTRAL, PACKAGE_FORMAT, PACKAGE_VERSION,
};

/// Fold `model` for frames normalised with `pixel_norm`.
pub fn fold(model: &PeClip, pixel_norm: PixelNorm) -> Result<FoldedModel> {
    FoldedModel::from_model(model, pixel_norm).map_err(|e| Error::engine("folding the model", e))
}

/// The f32 step graph of a folded model.
pub fn f32_graph(folded: &FoldedModel) -> Graph {
    build_step_graph(folded, &BuildOptions::default())
}

/// How `export` quantizes.
#[derive(Debug, Clone)]
pub struct Int8Options {
    pub observer: ObserverKind,
    /// SmoothQuant strength (None: no equalization).
    pub smooth_alpha: Option<f32>,
    /// One weight scale per output column (slower in tract: the rescale is not fused).
    pub per_channel: bool,
    /// Also quantize the adapters' projections (ShA up, TDA in/up).
    pub quantize_adapters: bool,
    /// Calibration clips and where they came from.
    pub calib: Vec<LabelledClip>,
    pub calib_source: String,
}

/// What `export` does.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub int8: Option<Int8Options>,
    /// Held-out clips for the int8-vs-f32 fidelity check.
    pub check: Vec<LabelledClip>,
    pub check_source: String,
    pub window: usize,
    /// Camera frames between sampled frames; `None`: the calibration clips' median length over
    /// the window (the spacing the test-time sampler gives such clips), else 1.
    pub stride: Option<usize>,
    pub face_crop: String,
}

/// Per block: MatMul nodes before folding (as the candle model runs them) and in the step graph.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MatmulCount {
    pub block: usize,
    pub unfolded: usize,
    pub folded: usize,
}

/// What `export` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportReport {
    pub package: PathBuf,
    pub precision: Precision,
    pub model_bytes: usize,
    /// Size of the f32 model of the same run (equal to `model_bytes` for an f32 export).
    pub f32_model_bytes: usize,
    pub matmuls: Vec<MatmulCount>,
    pub quantization: Option<Quantization>,
    pub seconds: f64,
}

/// MatMul-like nodes (`MatMul`, `MatMulInteger`) under `scope/`.
pub fn matmuls_in_scope(g: &Graph, scope: &str) -> usize {
    let prefix = format!("{scope}/");
    g.nodes
        .iter()
        .filter(|n| (n.op == "MatMul" || n.op == "MatMulInteger") && n.name.starts_with(&prefix))
        .count()
}

fn load_step(g: &Graph, what: &str) -> Result<StepModel> {
    StepModel::from_onnx(&crate::onnx::to_bytes(g, &[]), what)
}

/// Run `g` with its calibration taps over every clip, feeding `cal`.
fn observe(g: &Graph, cal: &mut Calibrator, clips: &[Vec<Vec<u8>>], what: &str) -> Result<()> {
    let taps = cal.taps();
    let mut step = load_step(&g.with_taps(&taps), what)?;
    crate::calibration::observe(&mut step, cal, clips)
}

/// The manifest's name of a recurrent cell (`None` for a block without state).
fn cell_kind(c: TemporalCell) -> Option<CellKind> {
    match c {
        TemporalCell::Gru => Some(CellKind::Gru),
        TemporalCell::Lstm => Some(CellKind::Lstm),
        TemporalCell::Rnn => Some(CellKind::Rnn),
        TemporalCell::None => None,
    }
}

/// The test-time frames of clips as the step model's input (whole frames: export's clips are
/// face crops already).
fn spec_of(image_size: usize) -> pe_clip_models::PreprocessSpec {
    pe_clip_models::PreprocessSpec {
        image_size,
        pixel_norm: PixelNorm::None,
    }
}

/// Compare two step graphs clip by clip on `clips` through `head`.
pub fn fidelity(
    reference: &Graph,
    candidate: &Graph,
    head: &Head,
    clips: &[LabelledClip],
    window: usize,
    image_size: usize,
    source: &str,
) -> Result<Fidelity> {
    let mut a = load_step(reference, "f32 model")?;
    let mut b = load_step(candidate, "int8 model")?;
    let mut tally = AgreementTally::default();
    let classes = head.text_features.len();
    let (mut ca, mut cb) = (Confusion::new(classes), Confusion::new(classes));
    let mut labelled = 0usize;
    let spec = spec_of(image_size);
    for c in clips {
        let frames = match load_clip(&spec, c, window, RoiPolicy::Full)? {
            Ok(loaded) => loaded.frames,
            Err(why) => {
                log::warn!("fidelity check: skipping {}: {why}", c.path.display());
                continue;
            }
        };
        let fa = clip_features(&mut a, &frames)?;
        let fb = clip_features(&mut b, &frames)?;
        let la = head.logits_of_features(fa.iter().map(Vec::as_slice));
        let lb = head.logits_of_features(fb.iter().map(Vec::as_slice));
        tally.add(&la, &lb);
        if let Some(y) = c.label {
            ca.add(y, argmax(&la));
            cb.add(y, argmax(&lb));
            labelled += 1;
        }
    }
    if tally.clips() == 0 {
        return Err(Error::Input(format!(
            "{source}: no readable clip to check fidelity on"
        )));
    }
    let uar = |c: &Confusion| (labelled > 0).then(|| c.metrics().uar);
    Ok(Fidelity::new(
        source.to_string(),
        tally.finish(),
        uar(&ca),
        uar(&cb),
    ))
}

/// The population's neutral reference for driver profiles: the exported model's mean per-frame
/// feature over the calibration clips labelled neutral (the held-out check clips when there are
/// none). `None` without such clips or without a class named neutral.
fn neutral_reference(
    graph: &Graph,
    model: &PeClip,
    opts: &ExportOptions,
    image_size: usize,
) -> Result<Option<NeutralReference>> {
    let Some(neutral) = model.classes.classes.iter().position(|c| c.name == NEUTRAL) else {
        return Ok(None);
    };
    let calib: &[LabelledClip] = opts.int8.as_ref().map_or(&[], |q| &q.calib);
    let pick = |clips: &[LabelledClip]| -> Vec<LabelledClip> {
        clips
            .iter()
            .filter(|c| c.label == Some(neutral))
            .cloned()
            .collect()
    };
    let (clips, source) = match pick(calib) {
        p if !p.is_empty() => (p, opts.int8.as_ref().map(|q| q.calib_source.clone())),
        _ => (pick(&opts.check), Some(opts.check_source.clone())),
    };
    let loaded = load_clips(&spec_of(image_size), &clips, opts.window, RoiPolicy::Full)?;
    if loaded.clips.is_empty() {
        return Ok(None);
    }
    let mut step = load_step(graph, "neutral reference")?;
    let (feature, frames) = crate::calibration::neutral_mean(&mut step, &loaded.clips)?;
    Ok(Some(NeutralReference {
        feature,
        source: format!("{} (clips labelled {NEUTRAL})", source.unwrap_or_default()),
        clips: loaded.clips.len(),
        frames,
    }))
}

/// Export `model` (preprocessed as `preprocess`) to a package at `out`.
pub fn export(
    model: &PeClip,
    preprocess: &PreprocessSpec,
    provenance: Provenance,
    out: &Path,
    opts: &ExportOptions,
) -> Result<ExportReport> {
    let t0 = Instant::now();
    if opts.window == 0 || opts.stride == Some(0) {
        return Err(Error::Input("window and stride must be at least 1".into()));
    }
    let folded = fold(model, preprocess.pixel_norm)?;
    let s = folded.image_size;
    let quantize_adapters = opts.int8.as_ref().is_some_and(|q| q.quantize_adapters);
    let g32 = build_step_graph(
        &folded,
        &BuildOptions {
            quantize_adapters,
            ..Default::default()
        },
    );
    let head = Head {
        feature_dim: folded.feature_dim(),
        logit_scale: folded.logit_scale,
        text_features: folded
            .text_features
            .chunks_exact(folded.feature_dim())
            .map(<[f32]>::to_vec)
            .collect(),
    };
    let f32_bytes = crate::onnx::to_bytes(&g32, &[]);
    let mut lengths = Vec::new();
    let (graph, quantization) = match &opts.int8 {
        None => (g32.clone(), None),
        Some(q) => {
            if q.calib.is_empty() {
                return Err(Error::Input(
                    "int8 export needs calibration clips (--calib)".into(),
                ));
            }
            let t = Instant::now();
            let loaded = load_clips(&spec_of(s), &q.calib, opts.window, RoiPolicy::Full)?;
            if loaded.clips.is_empty() {
                return Err(Error::Input(format!(
                    "{}: none of the {} calibration clips could be read",
                    q.calib_source,
                    q.calib.len()
                )));
            }
            lengths.extend(loaded.clips.iter().map(|c| c.length));
            let clips: Vec<Vec<Vec<u8>>> = loaded.clips.into_iter().map(|c| c.frames).collect();
            let frames: usize = clips.iter().map(Vec::len).sum();
            log::info!(
                "calibration: {} clips, {frames} frames loaded in {:.1} s",
                clips.len(),
                t.elapsed().as_secs_f64()
            );
            // Pass 1: per-channel input ranges of the LayerNorm-fed layers → SmoothQuant factors.
            let calibrated = match q.smooth_alpha {
                Some(alpha) => {
                    let t = Instant::now();
                    let mut cal = Calibrator::new(&g32, ObserverKind::MinMax);
                    observe(&g32, &mut cal, &clips, "calibration pass 1")?;
                    let smooth = smoothing_factors(&g32, &cal.input_channel_absmax(), alpha);
                    log::info!(
                        "calibration pass 1 (equalization, {} layers): {:.1} s",
                        smooth.len(),
                        t.elapsed().as_secs_f64()
                    );
                    build_step_graph(
                        &folded,
                        &BuildOptions {
                            smooth,
                            quantize_adapters,
                        },
                    )
                }
                None => g32.clone(),
            };
            // Pass 2: activation ranges with the chosen observer.
            let t = Instant::now();
            let mut cal = Calibrator::new(&calibrated, q.observer);
            observe(&calibrated, &mut cal, &clips, "calibration pass 2")?;
            let ranges = cal.ranges();
            let (gq, layers) =
                pe_clip_calibrate::graph::quantize(&calibrated, &ranges, q.per_channel);
            log::info!(
                "calibration pass 2 ({} observer): {} layers quantized in {:.1} s",
                q.observer,
                layers.len(),
                t.elapsed().as_secs_f64()
            );
            let fid = if opts.check.is_empty() {
                None
            } else {
                let t = Instant::now();
                let f = fidelity(
                    &g32,
                    &gq,
                    &head,
                    &opts.check,
                    opts.window,
                    s,
                    &opts.check_source,
                )?;
                log::info!(
                    "fidelity on {} clips: {:.1} s",
                    f.clips,
                    t.elapsed().as_secs_f64()
                );
                Some(f)
            };
            let quant = Quantization {
                scheme: format!(
                    "int8 linear layers: QuantizeLinear (signed int8, zero point 0) -> \
                     MatMulInteger -> i32 bias -> f32 rescale, {} weight scales; attention \
                     products, softmax, norms, activations and recurrent cells in f32",
                    if q.per_channel {
                        "per-column"
                    } else {
                        "per-tensor"
                    }
                ),
                observer: q.observer.to_string(),
                smooth_alpha: q.smooth_alpha,
                per_channel: q.per_channel,
                quantized_layers: layers.len(),
                linear_layers: calibrated.linears.len(),
                calibration: CalibrationSummary {
                    source: q.calib_source.clone(),
                    clips: clips.len(),
                    frames,
                    clip_list_sha256: clip_list_sha256(q.calib.iter().map(|c| c.path.as_path())),
                },
                fidelity: fid,
                recalibration: None,
            };
            (gq, Some(quant))
        }
    };
    let matmuls = (0..folded.blocks.len())
        .map(|i| MatmulCount {
            block: i,
            unfolded: folded.unfolded_matmuls(i),
            folded: matmuls_in_scope(&graph, &format!("block{i}")),
        })
        .collect();
    let neutral_reference = neutral_reference(&graph, model, opts, s)?;
    let precision = if quantization.is_some() {
        Precision::Int8
    } else {
        Precision::F32
    };
    let stride = opts.stride.unwrap_or_else(|| {
        lengths.sort_unstable();
        match lengths.get(lengths.len() / 2) {
            Some(&n) => (n as f64 / opts.window as f64).round().max(1.0) as usize,
            None => 1,
        }
    });
    let onnx = crate::onnx::to_bytes(
        &graph,
        &[
            ("pe_clip.precision", precision.to_string()),
            ("pe_clip.image_size", s.to_string()),
        ],
    );
    let state = folded
        .state_layout()
        .into_iter()
        .map(|(block, rows, width)| {
            let cell = match &folded.blocks[block].temporal {
                Some(FoldedTemporal::Recurrent(t)) => cell_kind(t.cell),
                _ => None,
            }
            .ok_or_else(|| {
                Error::Input(format!("block {block} has state but no recurrent cell"))
            })?;
            Ok(StateEntry {
                block,
                input: pe_clip_models::package::io::state_input(block),
                output: pe_clip_models::package::io::state_output(block),
                rows,
                width,
                cell,
            })
        })
        .collect::<Result<_>>()?;
    let manifest = Manifest {
        format: PACKAGE_FORMAT.into(),
        version: PACKAGE_VERSION,
        precision,
        model: MODEL_FILE.into(),
        opset: crate::onnx::OPSET,
        classes: model
            .classes
            .classes
            .iter()
            .map(|c| ClassEntry {
                name: c.name.clone(),
                text: c.descriptor.clone(),
            })
            .collect(),
        head,
        preprocess: Preprocess {
            image_size: s,
            color: ColorOrder::Rgb,
            layout: FrameLayout::NhwcU8,
            pixel_norm: preprocess.pixel_norm,
            resize: Resize::BilinearPilExact,
            face_crop: opts.face_crop.clone(),
        },
        temporal: Temporal {
            window: opts.window,
            stride,
        },
        state,
        quantization: quantization.clone(),
        provenance,
        neutral_reference,
        checksums: Vec::new(),
    };
    write_package(out, manifest, &[(MODEL_FILE, &onnx)])?;
    Ok(ExportReport {
        package: out.to_path_buf(),
        precision,
        model_bytes: onnx.len(),
        f32_model_bytes: f32_bytes.len(),
        matmuls,
        quantization,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::engine::StepModel;
    use candle_core::{Device, Tensor};
    use pe_clip_models::clip::random::write_random_model;
    use pe_clip_models::clip::{Arch, ClipConfig, ClipModel};
    use pe_clip_models::peclip::{
        trainable_specs, PeClipConfig, ScaleAt, StreamState, Streamer, TemporalCell, Trainables,
    };
    use pe_clip_models::preprocess::to_chw;
    use pe_clip_models::rng::SeededRng;
    use pe_clip_models::tokenizer::ClipTokenizer;
    use pe_clip_models::video::load_sampled_clip;
    use pe_clip_models::ClassSet;
    use std::path::Path;

    fn model(cfg: PeClipConfig, seed: u64) -> PeClip {
        model_of(Arch::Tiny, cfg, seed)
    }

    fn model_of(arch: Arch, cfg: PeClipConfig, seed: u64) -> PeClip {
        let dir = tempfile::tempdir().unwrap();
        write_random_model(dir.path(), &ClipConfig::preset(arch), seed).unwrap();
        let clip = ClipModel::load(dir.path(), &Device::Cpu).unwrap();
        let specs = trainable_specs(&cfg, &clip.config);
        let t = Trainables::init(specs, seed, &Device::Cpu)
            .unwrap()
            .into_inference();
        t.perturb(seed + 1, 0.05, 0.5).unwrap();
        let tok = ClipTokenizer::from_hf_dir(dir.path()).unwrap();
        PeClip::new(cfg, clip, t, ClassSet::default(), &tok).unwrap()
    }

    fn frames(n: usize, s: usize, seed: u64) -> Vec<Vec<u8>> {
        let mut rng = SeededRng::new(seed);
        (0..n)
            .map(|_| {
                (0..s * s * 3)
                    .map(|_| (rng.next_u64() & 0xff) as u8)
                    .collect()
            })
            .collect()
    }

    /// Largest |a - b| over the per-frame features of `frames` streamed through candle and
    /// through the exported f32 step model in tract.
    fn max_feature_gap(m: &PeClip, norm: PixelNorm, frames: &[Vec<u8>]) -> f32 {
        let folded = fold(m, norm).unwrap();
        let g = f32_graph(&folded);
        let bytes = crate::onnx::to_bytes(&g, &[]);
        let mut step = StepModel::from_onnx(&bytes, "test").unwrap();
        let s = step.image_size();
        let streamer = Streamer::new(m).unwrap();
        let mut cs = StreamState::new(m);
        let mut ts = step.zero_state();
        let mut worst = 0f32;
        for f in frames {
            let img = image::RgbImage::from_raw(s as u32, s as u32, f.clone()).unwrap();
            let px = Tensor::from_vec(to_chw(&img, norm), (3, s, s), &Device::Cpu).unwrap();
            let (want, next) = streamer.step(&px, cs).unwrap();
            cs = next;
            let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let got = step.step(f, &mut ts).unwrap();
            assert_eq!(got.len(), want.len());
            for (a, b) in got.iter().zip(&want) {
                worst = worst.max((a - b).abs());
            }
        }
        worst
    }

    /// The tiny test model's preprocessing: 32 px, scaled to 0..1 inside the model.
    fn spec32() -> PreprocessSpec {
        PreprocessSpec {
            image_size: 32,
            pixel_norm: PixelNorm::None,
        }
    }

    fn provenance() -> Provenance {
        Provenance {
            checkpoint: "test".into(),
            checkpoint_sha256: crate::package::sha256_hex(b"test"),
            config: serde_json::json!({}),
            source_revision: "test".into(),
            pe_clip_version: "test".into(),
            created_unix: 0,
        }
    }

    /// A small synthetic dataset (DFEW layout) at the tiny model's size.
    fn dataset(dir: &Path, train: usize, test: usize) -> (Vec<LabelledClip>, Vec<LabelledClip>) {
        use pe_clip_models::dataset::Split;
        use pe_clip_models::synth::{write_dataset, DatasetOptions, SynthOptions};
        write_dataset(
            dir,
            &DatasetOptions {
                train,
                test,
                seed: 5,
                size: 32,
                clip: SynthOptions::default(),
            },
        )
        .unwrap();
        let get = |split| LabelledClip::from_dataset(dir, split, 1, &ClassSet::default()).unwrap();
        (get(Split::Train), get(Split::Test))
    }

    fn options(int8: Option<Int8Options>, check: Vec<LabelledClip>) -> ExportOptions {
        ExportOptions {
            int8,
            check,
            check_source: "test clips".into(),
            window: 16,
            stride: None,
            face_crop: "none".into(),
        }
    }

    /// A tiny random-weight PE-CLIP exported as an f32 package at 32 px (runtime tests).
    pub(crate) fn tiny_f32_package(dir: &Path, seed: u64) -> crate::package::Package {
        let m = model(PeClipConfig::default(), seed);
        let spec = spec32();
        export(&m, &spec, provenance(), dir, &options(None, Vec::new())).unwrap();
        crate::package::Package::open(dir).unwrap()
    }

    /// An exported f32 package gives the candle model's clip logits (16 test-time frames, GRU
    /// state from zero) through the manifest's head; loading refuses a damaged model file and an
    /// unknown manifest version, naming the file.
    #[test]
    fn f32_package_reproduces_candle_clip_logits_and_verifies_itself() {
        use crate::package::{Package, MANIFEST_FILE};
        use pe_clip_models::peclip::GruMode;
        use pe_clip_models::zero_shot::{l2_normalize, pixels_of};

        let tmp = tempfile::tempdir().unwrap();
        let (train, _) = dataset(&tmp.path().join("data"), 4, 0);
        let m = model(PeClipConfig::default(), 21);
        let spec = spec32();
        let pkg_dir = tmp.path().join("pkg");
        let report = export(
            &m,
            &spec,
            provenance(),
            &pkg_dir,
            &options(None, Vec::new()),
        )
        .unwrap();
        assert_eq!(report.precision, Precision::F32);
        // The ShA down-projection is fused with the attention output, the TDA scale with its
        // down-projection: fewer MatMuls per block than the unfolded model.
        for c in &report.matmuls {
            assert!(c.folded < c.unfolded, "{c:?}");
        }
        let pkg = Package::open(&pkg_dir).unwrap();
        assert_eq!(pkg.manifest.classes.len(), 7);
        // No labelled clips were given: no neutral reference.
        assert!(pkg.manifest.neutral_reference.is_none());
        assert_eq!(pkg.manifest.temporal.window, 16);
        let mut step = pkg.step_model().unwrap();
        let text = l2_normalize(&m.text_features().unwrap()).unwrap();
        for c in &train {
            let clip = load_sampled_clip(&c.path, 16).unwrap();
            let px = pixels_of(&clip, &spec, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let want = m
                .forward_with_text(&px, GruMode::PerVideo, &text)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let frames = load_clip(&spec_of(32), c, 16, RoiPolicy::Full)
                .unwrap()
                .unwrap()
                .frames;
            let feats = clip_features(&mut step, &frames).unwrap();
            let got = pkg
                .manifest
                .head
                .logits_of_features(feats.iter().map(Vec::as_slice));
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    (a - b).abs() < 1e-3,
                    "{}: {got:?} vs {want:?}",
                    c.path.display()
                );
            }
        }
        // A flipped byte in model.onnx is refused with the file named.
        let onnx = pkg_dir.join(MODEL_FILE);
        let mut bytes = std::fs::read(&onnx).unwrap();
        let k = bytes.len() / 2;
        bytes[k] ^= 0x40;
        std::fs::write(&onnx, &bytes).unwrap();
        let err = Package::open(&pkg_dir).unwrap_err().to_string();
        assert!(
            err.contains("model.onnx") && err.contains("checksum"),
            "{err}"
        );
        // A manifest of an unknown version is refused before anything else.
        let mpath = pkg_dir.join(MANIFEST_FILE);
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
        v["version"] = 99.into();
        std::fs::write(&mpath, serde_json::to_vec(&v).unwrap()).unwrap();
        let err = Package::open(&pkg_dir).unwrap_err().to_string();
        assert!(err.contains("version 99"), "{err}");
        // Exporting again replaces the package; a directory that is not a package is refused.
        export(
            &m,
            &spec,
            provenance(),
            &pkg_dir,
            &options(None, Vec::new()),
        )
        .unwrap();
        Package::open(&pkg_dir).unwrap();
        let other = tmp.path().join("other");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("notes.txt"), "mine").unwrap();
        let err = export(&m, &spec, provenance(), &other, &options(None, Vec::new()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a pe-clip package"), "{err}");
        assert_eq!(
            std::fs::read_to_string(other.join("notes.txt")).unwrap(),
            "mine"
        );
    }

    /// The int8 export rewrites the backbone's four linear layers per block to `MatMulInteger`,
    /// calibrates on clips, and stays close to the f32 model on other clips.
    #[test]
    fn int8_package_is_calibrated_quantized_and_close_to_f32() {
        use crate::package::Package;
        let tmp = tempfile::tempdir().unwrap();
        let (train, test) = dataset(&tmp.path().join("data"), 6, 6);
        let m = model(PeClipConfig::default(), 22);
        let spec = spec32();
        for per_channel in [false, true] {
            let pkg_dir = tmp.path().join(format!("pkg-{per_channel}"));
            let int8 = Int8Options {
                observer: ObserverKind::Mse,
                smooth_alpha: Some(0.5),
                per_channel,
                quantize_adapters: false,
                calib: train.clone(),
                calib_source: "train clips".into(),
            };
            let report = export(
                &m,
                &spec,
                provenance(),
                &pkg_dir,
                &options(Some(int8), test.clone()),
            )
            .unwrap();
            let q = report.quantization.as_ref().unwrap();
            let blocks = report.matmuls.len();
            assert_eq!(q.quantized_layers, 4 * blocks);
            assert_eq!(q.calibration.clips, 6);
            assert_eq!(q.calibration.frames, 6 * 16);
            let f = q.fidelity.as_ref().unwrap();
            assert_eq!(f.clips, 6);
            assert!(f.logit_cosine_min > 0.999, "{per_channel}: {f:?}");
            let pkg = Package::open(&pkg_dir).unwrap();
            assert_eq!(pkg.manifest.precision, Precision::Int8);
            // The one calibration clip labelled neutral gives the neutral reference.
            let r = pkg.manifest.neutral_reference.as_ref().unwrap();
            assert_eq!((r.clips, r.frames, r.feature.len()), (1, 16, 32));
            // Re-calibrating on the same clips with the same observer, observed like the export
            // (f32 activations), finds the export's ranges again (the weights are int8 now).
            let calib_dir = tmp.path().join("calib-copy");
            let _ = std::fs::remove_dir_all(&calib_dir);
            std::fs::create_dir_all(&calib_dir).unwrap();
            for (k, c) in train.iter().enumerate() {
                std::os::unix::fs::symlink(&c.path, calib_dir.join(format!("clip{k}"))).unwrap();
            }
            let r = crate::calibration::recalibrate(
                &pkg_dir,
                &calib_dir,
                &crate::calibration::RangeOptions {
                    observer: None,
                    observe: crate::calibration::Observation::F32,
                    roi: crate::frames::roi::RoiPolicy::Full,
                    check: None,
                    check_f32: None,
                },
            )
            .unwrap();
            let rec = r.recalibration;
            assert_eq!((rec.layers, rec.frames), (4 * blocks, 6 * 16));
            assert!(
                rec.threshold_ratio_min > 0.98 && rec.threshold_ratio_max < 1.02,
                "{per_channel}: {rec:?}"
            );
            crate::package::rollback(&pkg_dir).unwrap();
            let pkg = Package::open(&pkg_dir).unwrap();
            let onnx = std::fs::read(pkg.model_path()).unwrap();
            let text = String::from_utf8_lossy(&onnx);
            assert!(text.contains("MatMulInteger"));
            // The package runs: one frame through the loaded int8 model.
            let mut step = pkg.step_model().unwrap();
            let mut st = step.zero_state();
            let feat = step.step(&vec![128u8; 32 * 32 * 3], &mut st).unwrap();
            assert!(feat.iter().all(|v| v.is_finite()));
        }
    }

    /// The same equivalence at the real shape (random weights).
    #[test]
    #[ignore = "ViT-B/16 shape: about 1 GB of weights and a minute of CPU; run with --ignored"]
    fn folded_f32_step_model_matches_candle_streaming_vit_b16() {
        let m = model_of(Arch::VitB16, PeClipConfig::default(), 31);
        let gap = max_feature_gap(&m, PixelNorm::None, &frames(3, 224, 4));
        eprintln!("ViT-B/16: largest feature difference {gap:e}");
        assert!(gap < 1e-4, "features differ by {gap}");
    }

    #[test]
    fn folded_f32_step_model_matches_candle_streaming() {
        let base = PeClipConfig::default();
        let variants = [
            ("reference", base.clone(), PixelNorm::None),
            ("clip-norm", base.clone(), PixelNorm::Clip),
            (
                "lstm-input-scale",
                PeClipConfig {
                    temporal_cell: TemporalCell::Lstm,
                    scale_at: ScaleAt::Input,
                    ..base.clone()
                },
                PixelNorm::None,
            ),
            (
                "rnn-gru-output-scale",
                PeClipConfig {
                    temporal_cell: TemporalCell::Rnn,
                    scale_at: ScaleAt::GruOutput,
                    ..base.clone()
                },
                PixelNorm::None,
            ),
            (
                "plain-tda-no-prompts",
                PeClipConfig {
                    temporal_cell: TemporalCell::None,
                    prompts: pe_clip_models::peclip::PromptConfig {
                        enabled: false,
                        ..Default::default()
                    },
                    ..base.clone()
                },
                PixelNorm::None,
            ),
            (
                "no-adapters",
                PeClipConfig {
                    adapters: pe_clip_models::peclip::AdapterSwitches {
                        vision_shared: false,
                        temporal: false,
                        text_shared: false,
                        text: false,
                    },
                    ..base.clone()
                },
                PixelNorm::None,
            ),
        ];
        for (i, (name, cfg, norm)) in variants.into_iter().enumerate() {
            let m = model(cfg, 10 + i as u64);
            let s = m.clip.config.vision_config.image_size;
            let gap = max_feature_gap(&m, norm, &frames(5, s, 3));
            assert!(gap < 1e-4, "{name}: features differ by {gap}");
        }
    }
}

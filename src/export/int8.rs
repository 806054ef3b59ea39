//! The int8 half of export: two calibration passes over the step graph (SmoothQuant factors,
//! then activation ranges), the quantized graph, and its fidelity against the f32 graph.

use std::time::Instant;

use pe_clip_calibrate::calibrator::{smoothing_factors, Calibrator};
use pe_clip_calibrate::graph::Graph;
use pe_clip_calibrate::ObserverKind;
use pe_clip_models::export::{build_step_graph, BuildOptions, FoldedModel};
use pe_clip_models::metrics::{AgreementTally, Confusion};
use pe_clip_models::prediction::argmax;

use super::{spec_of, ExportOptions, Int8Options};
use crate::engine::StepModel;
use crate::error::{Error, Result};
use crate::frames::clip_features;
use crate::frames::clips::{clip_list_sha256, load_clip, load_clips, LabelledClip};
use crate::frames::roi::RoiPolicy;
use crate::package::{CalibrationSummary, Fidelity, Head, Quantization};

/// The quantized graph, what the manifest records of it, and the calibration clips' lengths.
pub(super) struct Int8Export {
    pub graph: Graph,
    pub quantization: Quantization,
    pub clip_lengths: Vec<usize>,
}

/// Calibrate and quantize `g32` (the f32 step graph of `folded`) as `q` says; check it against
/// `g32` on the held-out clips of `opts`, if any.
pub(super) fn quantize_int8(
    folded: &FoldedModel,
    g32: &Graph,
    head: &Head,
    q: &Int8Options,
    opts: &ExportOptions,
) -> Result<Int8Export> {
    if q.calib.is_empty() {
        return Err(Error::usage(
            "int8 export needs calibration clips (--calib)",
        ));
    }
    let s = folded.image_size;
    let t = Instant::now();
    let loaded = load_clips(&spec_of(s), &q.calib, opts.window, RoiPolicy::Full)?;
    if loaded.clips.is_empty() {
        return Err(Error::invalid(
            &q.calib_source,
            format!(
                "none of the {} calibration clips could be read",
                q.calib.len()
            ),
        ));
    }
    let clip_lengths = loaded.clips.iter().map(|c| c.length).collect();
    let clips: Vec<Vec<Vec<u8>>> = loaded.clips.into_iter().map(|c| c.frames).collect();
    let frames: usize = clips.iter().map(Vec::len).sum();
    log::info!(
        "calibration: {} clips, {frames} frames loaded in {:.1} s",
        clips.len(),
        t.elapsed().as_secs_f64()
    );
    let calibrated = equalized(folded, g32, q, &clips)?;
    // Pass 2: activation ranges with the chosen observer.
    let t = Instant::now();
    let mut cal = Calibrator::new(&calibrated, q.observer);
    observe(&calibrated, &mut cal, &clips, "calibration pass 2")?;
    let ranges = cal.ranges();
    let (gq, layers) = pe_clip_calibrate::int8::quantize(&calibrated, &ranges, q.per_channel);
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
            load_step(g32, "f32 model")?,
            load_step(&gq, "int8 model")?,
            head,
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
    let quantization = Quantization {
        quantized_layers: layers.len(),
        linear_layers: calibrated.linears.len(),
        calibration: CalibrationSummary {
            source: q.calib_source.clone(),
            clips: clips.len(),
            frames,
            clip_list_sha256: clip_list_sha256(q.calib.iter().map(|c| c.path.as_path())),
        },
        fidelity: fid,
        scheme: scheme(q.per_channel),
        observer: q.observer.to_string(),
        smooth_alpha: q.smooth_alpha,
        per_channel: q.per_channel,
        recalibration: None,
    };
    Ok(Int8Export {
        graph: gq,
        quantization,
        clip_lengths,
    })
}

/// The manifest's words for the int8 scheme.
fn scheme(per_channel: bool) -> String {
    format!(
        "int8 linear layers: QuantizeLinear (signed int8, zero point 0) -> MatMulInteger -> i32 \
         bias -> f32 rescale, {} weight scales; attention products, softmax, norms, activations \
         and recurrent cells in f32",
        if per_channel {
            "per-column"
        } else {
            "per-tensor"
        }
    )
}

/// Pass 1: per-channel input ranges of the LayerNorm-fed layers give SmoothQuant factors, and
/// the graph rebuilt with them (`g32` itself without `--smooth`).
fn equalized(
    folded: &FoldedModel,
    g32: &Graph,
    q: &Int8Options,
    clips: &[Vec<Vec<u8>>],
) -> Result<Graph> {
    let Some(alpha) = q.smooth_alpha else {
        return Ok(g32.clone());
    };
    let t = Instant::now();
    let mut cal = Calibrator::new(g32, ObserverKind::MinMax);
    observe(g32, &mut cal, clips, "calibration pass 1")?;
    let smooth = smoothing_factors(g32, &cal.input_channel_absmax(), alpha);
    log::info!(
        "calibration pass 1 (equalization, {} layers): {:.1} s",
        smooth.len(),
        t.elapsed().as_secs_f64()
    );
    Ok(build_step_graph(
        folded,
        &BuildOptions {
            smooth,
            quantize_adapters: q.quantize_adapters,
        },
    ))
}

pub(super) fn load_step(g: &Graph, what: &str) -> Result<StepModel> {
    StepModel::from_onnx(&crate::onnx::to_bytes(g, &[]), what)
}

/// Run `g` with its calibration taps over every clip, feeding `cal`.
fn observe(g: &Graph, cal: &mut Calibrator, clips: &[Vec<Vec<u8>>], what: &str) -> Result<()> {
    let taps = cal.taps();
    let mut step = load_step(&g.with_taps(&taps), what)?;
    crate::calibration::observe(&mut step, cal, clips)
}

/// Compare two step models (the f32 reference, then the reduced one) clip by clip on `clips`
/// through `head`.
pub fn fidelity(
    mut a: StepModel,
    mut b: StepModel,
    head: &Head,
    clips: &[LabelledClip],
    window: usize,
    image_size: usize,
    source: &str,
) -> Result<Fidelity> {
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
        return Err(Error::invalid(
            source,
            "no readable clip to check fidelity on",
        ));
    }
    let uar = |c: &Confusion| (labelled > 0).then(|| c.metrics().uar);
    Ok(Fidelity::new(
        source.to_string(),
        tally.finish(),
        uar(&ca),
        uar(&cb),
    ))
}

//! `pe-clip export`: a trained run to a model package (fold, ONNX step graph, optional int8 with
//! calibration, manifest).
//!
//! The int8 recipe (see `pe_clip_calibrate::int8::quantize`): every backbone linear layer (qkv,
//! attention output with the fused ShA down-projection, fc1, fc2) becomes `QuantizeLinear →
//! MatMulInteger → Add(i32 bias) → Cast → Mul(scale)` with signed int8 at zero point 0 and one
//! scale per weight tensor, the bias folded into tract's int8 matmul kernel. Per-tensor scales lose
//! accuracy where activation channels differ in range, so SmoothQuant factors measured on the
//! calibration frames first move activation range into the weights through the preceding
//! LayerNorm (exact in f32). Attention products, softmax, norms, activations, the recurrent cells
//! and residual adds stay f32.

mod int8;

use std::path::{Path, PathBuf};
use std::time::Instant;

use pe_clip_calibrate::graph::Graph;
use pe_clip_calibrate::ObserverKind;
use pe_clip_models::export::{build_step_graph, BuildOptions, FoldedModel, FoldedTemporal};
use pe_clip_models::peclip::{PeClip, TemporalCell};
use pe_clip_models::{PixelNorm, PreprocessSpec};

use crate::error::{Error, Result};
use crate::frames::clips::{load_clips, LabelledClip};
use crate::frames::roi::RoiPolicy;
use crate::package::{
    write_package, CellKind, ClassEntry, ColorOrder, FrameLayout, HalfPrecision, Head, Manifest,
    NeutralReference, Precision, Preprocess, Provenance, Quantization, Resize, StateEntry,
    Temporal, MODEL_FILE, NEUTRAL, PACKAGE_FORMAT, PACKAGE_VERSION,
};

pub use int8::fidelity;
use int8::load_step;

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
    /// Linear layers in f16 ([`crate::onnx::f16_linears`]); not with `int8`.
    pub f16: bool,
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
    /// An f16 export's record (as in the manifest).
    pub half: Option<HalfPrecision>,
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
        return Err(Error::usage("window and stride must be at least 1"));
    }
    if opts.f16 && opts.int8.is_some() {
        return Err(Error::usage("a package is int8 or f16, not both"));
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
    let head = head_of(&folded);
    let f32_bytes = crate::onnx::to_bytes(&g32, &[]);
    let (graph, quantization, lengths) = match &opts.int8 {
        None => (g32.clone(), None, Vec::new()),
        Some(q) => {
            let int8 = int8::quantize_int8(&folded, &g32, &head, q, opts)?;
            (int8.graph, Some(int8.quantization), int8.clip_lengths)
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
    let precision = match (&quantization, opts.f16) {
        (Some(_), _) => Precision::Int8,
        (None, true) => Precision::F16,
        (None, false) => Precision::F32,
    };
    let stride = opts
        .stride
        .unwrap_or_else(|| median_stride(lengths, opts.window));
    let metadata = [
        ("pe_clip.precision", precision.to_string()),
        ("pe_clip.image_size", s.to_string()),
    ];
    let (onnx, half) = if opts.f16 {
        let (onnx, half) = half_precision(&graph, &head, opts, s, &metadata)?;
        (onnx, Some(half))
    } else {
        (crate::onnx::to_bytes(&graph, &metadata), None)
    };
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
        state: state_entries(&folded)?,
        quantization: quantization.clone(),
        half: half.clone(),
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
        half,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The f16 model of f32 step graph `graph` (written with `metadata`), and its record: the
/// linear layers in f16, checked against `graph` on the held-out clips when there are some.
fn half_precision(
    graph: &Graph,
    head: &Head,
    opts: &ExportOptions,
    image_size: usize,
    metadata: &[(&str, String)],
) -> Result<(Vec<u8>, HalfPrecision)> {
    use prost::Message;
    let proto = crate::onnx::to_model_proto(graph, metadata);
    let (half, matmuls) =
        crate::onnx::f16_linears(&proto).map_err(|e| Error::engine("f16 model", e))?;
    let bytes = half.encode_to_vec();
    let fidelity = if opts.check.is_empty() {
        None
    } else {
        let form = if crate::engine::f16_native_here() {
            "f16 products"
        } else {
            "f16 weights, f32 products: this CPU has no f16 arithmetic"
        };
        let f = int8::fidelity(
            int8::load_step(graph, "f32 model")?,
            crate::engine::StepModel::from_onnx(&bytes, "f16 model")?,
            head,
            &opts.check,
            opts.window,
            image_size,
            &format!("{} (checked with {form})", opts.check_source),
        )?;
        Some(f)
    };
    let record = HalfPrecision {
        scheme: "f16 weights and products in every linear layer (a MatMul by a constant), \
                 f32 inputs and outputs; LayerNorm, softmax, GELU, attention products, \
                 recurrent gates and states and the residual stream in f32"
            .into(),
        matmuls,
        fidelity,
    };
    Ok((bytes, record))
}

/// The classification head of a folded model: its text features, one row per class.
fn head_of(folded: &FoldedModel) -> Head {
    Head {
        feature_dim: folded.feature_dim(),
        logit_scale: folded.logit_scale,
        text_features: folded
            .text_features
            .chunks_exact(folded.feature_dim())
            .map(<[f32]>::to_vec)
            .collect(),
    }
}

/// The default stride: the calibration clips' median length over the window (the spacing the
/// test-time sampler gives such clips), 1 without clips.
fn median_stride(mut lengths: Vec<usize>, window: usize) -> usize {
    lengths.sort_unstable();
    match lengths.get(lengths.len() / 2) {
        Some(&n) => (n as f64 / window as f64).round().max(1.0) as usize,
        None => 1,
    }
}

/// The manifest's state entries: one per block with a recurrent cell, in block order.
fn state_entries(folded: &FoldedModel) -> Result<Vec<StateEntry>> {
    folded
        .state_layout()
        .into_iter()
        .map(|(block, rows, width)| {
            let cell = match &folded.blocks[block].temporal {
                Some(FoldedTemporal::Recurrent(t)) => cell_kind(t.cell),
                _ => None,
            }
            .ok_or_else(|| {
                Error::engine(
                    "export",
                    format!("block {block} has state but no recurrent cell"),
                )
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
        .collect()
}

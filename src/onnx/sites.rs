//! The int8 layers of a step model as `pe_clip_calibrate::int8::quantize` writes them: found
//! again by their constant names ([`SiteNames`]), with every size checked before use; their
//! activation scales rewritten (`pe-clip calibrate`); or the whole model dequantized to f32.

use pe_clip_calibrate::graph::ElemType;
use pe_clip_calibrate::site::SiteNames;

use super::pb;
use crate::error::OnnxError;

const FLOAT: i32 = ElemType::F32.onnx_code();
const INT8: i32 = ElemType::I8.onnx_code();
const INT32: i32 = ElemType::I32.onnx_code();
const INT64: i32 = ElemType::I64.onnx_code();

fn tensor_error(t: &pb::TensorProto, reason: impl Into<String>) -> OnnxError {
    OnnxError::Tensor {
        tensor: t.name.clone(),
        reason: reason.into(),
    }
}

fn site_error(layer: &str, reason: impl Into<String>) -> OnnxError {
    OnnxError::Site {
        layer: layer.to_string(),
        reason: reason.into(),
    }
}

fn graph_of(m: &pb::ModelProto) -> Result<&pb::GraphProto, OnnxError> {
    m.graph.as_ref().ok_or(OnnxError::NoGraph)
}

fn initializer<'a>(g: &'a pb::GraphProto, name: &str) -> Option<&'a pb::TensorProto> {
    g.initializer.iter().find(|t| t.name == name)
}

/// The 4-byte little-endian words of a tensor's raw data.
fn words(t: &pb::TensorProto) -> Result<Vec<[u8; 4]>, OnnxError> {
    if !t.raw_data.len().is_multiple_of(4) {
        return Err(tensor_error(
            t,
            format!("raw data of {} bytes", t.raw_data.len()),
        ));
    }
    Ok(t.raw_data
        .chunks_exact(4)
        .map(|b| [b[0], b[1], b[2], b[3]])
        .collect())
}

fn f32s(t: &pb::TensorProto) -> Result<Vec<f32>, OnnxError> {
    if t.data_type != FLOAT {
        return Err(tensor_error(t, "is not f32"));
    }
    if t.raw_data.is_empty() {
        return Ok(t.float_data.clone());
    }
    Ok(words(t)?.into_iter().map(f32::from_le_bytes).collect())
}

fn i32s(t: &pb::TensorProto) -> Result<Vec<i32>, OnnxError> {
    if t.data_type != INT32 {
        return Err(tensor_error(t, "is not i32"));
    }
    if t.raw_data.is_empty() {
        return Ok(t.int32_data.clone());
    }
    Ok(words(t)?.into_iter().map(i32::from_le_bytes).collect())
}

fn i64s(t: &pb::TensorProto) -> Result<Vec<i64>, OnnxError> {
    if t.data_type != INT64 {
        return Err(tensor_error(t, "is not i64"));
    }
    if t.raw_data.is_empty() {
        return Ok(t.int64_data.clone());
    }
    if !t.raw_data.len().is_multiple_of(8) {
        return Err(tensor_error(
            t,
            format!("raw data of {} bytes", t.raw_data.len()),
        ));
    }
    Ok(t.raw_data
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect())
}

fn i8s(t: &pb::TensorProto) -> Result<Vec<i8>, OnnxError> {
    if t.data_type != INT8 {
        return Err(tensor_error(t, "is not i8"));
    }
    if !t.raw_data.is_empty() {
        Ok(t.raw_data.iter().map(|&b| b as i8).collect())
    } else {
        Ok(t.int32_data.iter().map(|&v| v as i8).collect())
    }
}

fn f32_tensor(name: &str, dims: Vec<i64>, values: &[f32]) -> pb::TensorProto {
    pb::TensorProto {
        dims,
        data_type: FLOAT,
        name: name.to_string(),
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

/// One int8 linear layer of a step model, as `pe_clip_calibrate::int8::quantize` writes it
/// (constant names: [`SiteNames`]): `QuantizeLinear(input, x_scale) → MatMulInteger(weight_q) →
/// [Add(bias_q)] → Cast → Mul(rescale)`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantSite {
    pub name: String,
    /// The f32 value the layer quantizes (what calibration observes).
    pub input: String,
    pub in_dim: usize,
    pub out_dim: usize,
    pub scales: pe_clip_calibrate::requant::SiteScales,
}

/// The int8 linear layers of a model, in graph order. A `QuantizeLinear` whose constants are not
/// where `quantize` puts them, or whose constants disagree in size (weight elements vs its
/// shape, a rescale of neither 1 nor `out` values, a bias of other than `out`), is an error
/// naming it: every index later taken from these constants is in range.
pub fn quant_sites(m: &pb::ModelProto) -> Result<Vec<QuantSite>, OnnxError> {
    use pe_clip_calibrate::requant::SiteScales;
    let g = graph_of(m)?;
    let mut out = Vec::new();
    for node in g.node.iter().filter(|n| n.op_type == "QuantizeLinear") {
        let scale_name = node.input.get(1).cloned().unwrap_or_default();
        let Some(site) = SiteNames::of_x_scale(&scale_name) else {
            return Err(OnnxError::ForeignQuantize {
                node: node.name.clone(),
            });
        };
        let name = site.layer();
        let need = |constant: String| {
            initializer(g, &constant)
                .ok_or_else(|| site_error(name, format!("no constant {constant}")))
        };
        let x_scale = f32s(need(site.x_scale())?)?;
        let rescale = f32s(need(site.rescale())?)?;
        let weight = need(site.weight_q())?;
        let (in_dim, out_dim) = match weight.dims[..] {
            [i, o] if i > 0 && o > 0 => (i as usize, o as usize),
            _ => {
                return Err(site_error(
                    name,
                    format!("weight shape {:?} is not [in, out]", weight.dims),
                ))
            }
        };
        let weight_len = weight_elements(weight)?;
        if in_dim.checked_mul(out_dim) != Some(weight_len) {
            return Err(site_error(
                name,
                format!("weight has {weight_len} values for shape [{in_dim}, {out_dim}]"),
            ));
        }
        if rescale.len() != 1 && rescale.len() != out_dim {
            return Err(site_error(
                name,
                format!(
                    "rescale has {} values; expected 1 or {out_dim} (one per output column)",
                    rescale.len()
                ),
            ));
        }
        let bias_q = match initializer(g, &site.bias_q()) {
            Some(t) => Some(i32s(t)?),
            None => None,
        };
        if let Some(b) = &bias_q {
            if b.len() != out_dim {
                return Err(site_error(
                    name,
                    format!("bias has {} values for {out_dim} output columns", b.len()),
                ));
            }
        }
        let scales = SiteScales {
            x_scale: x_scale.first().copied().unwrap_or(0.0),
            rescale,
            bias_q,
        };
        if x_scale.len() != 1 || !scales.is_valid() {
            return Err(site_error(name, format!("invalid scales {scales:?}")));
        }
        out.push(QuantSite {
            name: name.to_string(),
            input: node.input.first().cloned().unwrap_or_default(),
            in_dim,
            out_dim,
            scales,
        });
    }
    Ok(out)
}

/// Elements an int8 tensor holds (raw bytes, or the `int32_data` fallback).
fn weight_elements(t: &pb::TensorProto) -> Result<usize, OnnxError> {
    if t.data_type != INT8 {
        return Err(tensor_error(t, "is not i8"));
    }
    Ok(if t.raw_data.is_empty() {
        t.int32_data.len()
    } else {
        t.raw_data.len()
    })
}

/// Replace the activation-dependent constants of int8 layer `name`.
pub fn set_site_scales(
    m: &mut pb::ModelProto,
    name: &str,
    s: &pe_clip_calibrate::requant::SiteScales,
) -> Result<(), OnnxError> {
    let g = m.graph.as_mut().ok_or(OnnxError::NoGraph)?;
    let site = SiteNames::new(name);
    let mut set = |full: String, data: Vec<u8>, len: usize| -> Result<(), OnnxError> {
        let Some(t) = g.initializer.iter_mut().find(|t| t.name == full) else {
            return Err(OnnxError::Constant {
                constant: full,
                reason: "no such constant".into(),
            });
        };
        let elems: i64 = t.dims.iter().product();
        if elems as usize != len {
            return Err(OnnxError::Constant {
                constant: full,
                reason: format!("{len} values for a tensor of {elems}"),
            });
        }
        t.raw_data = data;
        t.float_data.clear();
        t.int32_data.clear();
        Ok(())
    };
    set(site.x_scale(), s.x_scale.to_le_bytes().to_vec(), 1)?;
    set(
        site.rescale(),
        s.rescale.iter().flat_map(|v| v.to_le_bytes()).collect(),
        s.rescale.len(),
    )?;
    if let Some(b) = &s.bias_q {
        set(
            site.bias_q(),
            b.iter().flat_map(|v| v.to_le_bytes()).collect(),
            b.len(),
        )?;
    }
    Ok(())
}

/// The model with every int8 layer computed in f32 from its dequantized weights
/// (`W = W_q·s_w`, `b = b_q·r`): the int8 model without activation quantization, the reference
/// activation ranges are judged against when the original f32 model is not at hand.
pub fn dequantized(m: &pb::ModelProto) -> Result<pb::ModelProto, OnnxError> {
    let sites = quant_sites(m)?;
    let mut out = m.clone();
    let g = out.graph.as_mut().expect("quant_sites checked the graph");
    for site in &sites {
        let n = &site.name;
        let names = SiteNames::new(n.clone());
        let (chain, last) = site_chain(g, site)?;
        let wq = i8s(initializer(g, &names.weight_q()).ok_or_else(|| site_error(n, "no weight"))?)?;
        let sw = site.scales.weight_scales();
        let per_col = sw.len() > 1;
        let w: Vec<f32> = wq
            .iter()
            .enumerate()
            .map(|(k, &q)| q as f32 * sw[if per_col { k % site.out_dim } else { 0 }])
            .collect();
        let wname = format!("{n}.weight_deq");
        g.initializer.push(f32_tensor(
            &wname,
            vec![site.in_dim as i64, site.out_dim as i64],
            &w,
        ));
        let nodes = f32_nodes(g, site, wname, &last);
        replace_chain(g, chain, nodes);
    }
    drop_unread_initializers(g);
    Ok(out)
}

/// The node indices of a site's chain `QuantizeLinear → MatMulInteger → [Add] → Cast → Mul`,
/// each reading the last, and the name of the chain's output.
fn site_chain(g: &pb::GraphProto, site: &QuantSite) -> Result<(Vec<usize>, String), OnnxError> {
    let n = &site.name;
    let xq = SiteNames::new(n.clone()).x_q();
    let pos = g
        .node
        .iter()
        .position(|k| k.op_type == "QuantizeLinear" && k.output.first() == Some(&xq))
        .ok_or_else(|| site_error(n, format!("no QuantizeLinear writing {xq}")))?;
    let mut chain = vec![pos];
    let mut last = xq;
    for op in ["MatMulInteger", "Add", "Cast", "Mul"] {
        match g
            .node
            .iter()
            .position(|k| k.op_type == op && k.input.first() == Some(&last))
        {
            Some(i) => {
                last = g.node[i].output.first().cloned().unwrap_or_default();
                chain.push(i);
            }
            None if op == "Add" => {}
            None => return Err(site_error(n, format!("no {op} after {last}"))),
        }
    }
    // What replaces the chain assumes the zero points pe-clip writes: 0.
    for &i in &chain[..2] {
        for zp in g.node[i].input.iter().skip(2).filter(|z| !z.is_empty()) {
            let t = initializer(g, zp)
                .ok_or_else(|| site_error(n, format!("zero point {zp} is not a constant")))?;
            if i8s(t)?.iter().any(|&v| v != 0) {
                return Err(site_error(n, format!("zero point {zp} is not 0")));
            }
        }
    }
    Ok((chain, last))
}

/// `nodes` in place of the chain's nodes, where its first one was.
fn replace_chain(g: &mut pb::GraphProto, mut chain: Vec<usize>, nodes: Vec<pb::NodeProto>) {
    chain.sort_unstable();
    for &i in chain.iter().rev() {
        g.node.remove(i);
    }
    let at = chain[0];
    for (k, node) in nodes.into_iter().enumerate() {
        g.node.insert(at + k, node);
    }
}

/// The op type of a fused int8 layer (domain [`FUSED_DOMAIN`]), which `crate::engine`'s loader
/// registers in tract: inputs `x` (f32, `[.., in]`), `x_scale` (f32 scalar), `weight_q` (int8
/// `[in, out]`), `rescale` (f32, 1 or `out` values), optionally `bias_q` (int32 `[out]`); one f32
/// output `[.., out]`, or with the attribute `columns` (ints `s0, e0, s1, e1, ..`) one output
/// `[.., e_i - s_i]` per column range `s_i..e_i` (only those columns are computed); with the
/// attribute `quick_gelu_alpha` (float, one output only) the output is `y · σ(alpha · y)`.
pub const FUSED_OP_TYPE: &str = "PeClipInt8Linear";
/// The ONNX domain of [`FUSED_OP_TYPE`]: only pe-clip's own loader reads it.
pub const FUSED_DOMAIN: &str = "ai.pe-clip";

/// The model with every int8 layer's chain as one `PeClipInt8Linear` node
/// (`crate::engine::linear_i8`, which computes the same values): inputs the layer's input and
/// its `x_scale`, `weight_q`, `rescale` and (if any) `bias_q` constants. A layer read only by
/// `Slice`s of its last axis (the step model's `qkv` split into q, k and v) gets one output per
/// slice instead, so no copy is made and no unread column computed. Only pe-clip's loader reads
/// that operator. Untouched when the model has no int8 layer.
pub fn fused_int8_linears(m: &pb::ModelProto) -> Result<pb::ModelProto, OnnxError> {
    use FUSED_DOMAIN as DOMAIN;
    use FUSED_OP_TYPE as OP_TYPE;
    let sites = quant_sites(m)?;
    let mut out = m.clone();
    let g = out.graph.as_mut().expect("quant_sites checked the graph");
    for site in &sites {
        let names = SiteNames::new(site.name.clone());
        let (chain, last) = site_chain(g, site)?;
        let mut input = vec![
            site.input.clone(),
            names.x_scale(),
            names.weight_q(),
            names.rescale(),
        ];
        if site.scales.bias_q.is_some() {
            input.push(names.bias_q());
        }
        let mut node = pb::NodeProto {
            input,
            output: vec![last.clone()],
            name: format!("{}.fused/node", site.name),
            op_type: OP_TYPE.into(),
            domain: DOMAIN.into(),
            ..Default::default()
        };
        let slices = column_slices(g, &last, site.out_dim)?;
        if let Some(slices) = &slices {
            node.output = slices.outputs.clone();
            node.attribute.push(super::attribute(
                "columns",
                &pe_clip_calibrate::graph::Attr::Ints(slices.columns.clone()),
            ));
        }
        let gelu = match slices {
            None => quick_gelu_after(g, &last)?,
            Some(_) => None,
        };
        if let Some(gelu) = &gelu {
            node.output = vec![gelu.output.clone()];
            node.attribute.push(super::attribute(
                "quick_gelu_alpha",
                &pe_clip_calibrate::graph::Attr::Float(gelu.alpha),
            ));
        }
        replace_chain(g, chain, vec![node]);
        if let Some(slices) = slices {
            slices.absorb(g);
        }
        if let Some(gelu) = gelu {
            g.node.retain(|k| !gelu.nodes.contains(&k.name));
        }
    }
    if !sites.is_empty() && !out.opset_import.iter().any(|o| o.domain == DOMAIN) {
        out.opset_import.push(pb::OperatorSetIdProto {
            domain: DOMAIN.into(),
            version: 1,
        });
    }
    let g = out.graph.as_mut().expect("quant_sites checked the graph");
    drop_unread_initializers(g);
    Ok(out)
}

/// The nodes of `g` that read `value`.
fn readers<'a>(g: &'a pb::GraphProto, value: &str) -> Vec<&'a pb::NodeProto> {
    g.node
        .iter()
        .filter(|k| k.input.iter().any(|i| i == value))
        .collect()
}

fn is_graph_output(g: &pb::GraphProto, value: &str) -> bool {
    g.output.iter().any(|o| o.name == value)
}

/// CLIP's QuickGELU `y = x · σ(alpha · x)` as `Graph::quick_gelu` writes it after a layer:
/// `Mul(x, alpha) → Sigmoid → Mul(x, ·)`, the only readers of `x` and of each other.
struct QuickGelu {
    alpha: f32,
    /// The final `Mul`'s output.
    output: String,
    /// The three nodes' names.
    nodes: Vec<String>,
}

/// The QuickGELU that is all that reads `x`, if it is.
fn quick_gelu_after(g: &pb::GraphProto, x: &str) -> Result<Option<QuickGelu>, OnnxError> {
    let readers = |v: &str| readers(g, v);
    let is_output = |v: &str| is_graph_output(g, v);
    let other = |k: &pb::NodeProto, v: &str| -> Option<String> {
        match k.input.as_slice() {
            [a, b] if a == v && b != v => Some(b.clone()),
            [a, b] if b == v && a != v => Some(a.clone()),
            _ => None,
        }
    };
    let out = |k: &pb::NodeProto| k.output.first().cloned().unwrap_or_default();
    if is_output(x) {
        return Ok(None);
    }
    let xr = readers(x);
    if xr.len() != 2 || xr.iter().any(|k| k.op_type != "Mul") {
        return Ok(None);
    }
    for (scale, last) in [(xr[0], xr[1]), (xr[1], xr[0])] {
        let Some(alpha) = other(scale, x).and_then(|c| initializer(g, &c).cloned()) else {
            continue;
        };
        // Not a single f32 (a constant of another type, or a tensor): not QuickGELU.
        let Some(&[alpha]) = f32s(&alpha).ok().as_deref() else {
            continue;
        };
        let sr = readers(&out(scale));
        let [sigmoid] = sr.as_slice() else { continue };
        if sigmoid.op_type != "Sigmoid" || is_output(&out(scale)) || is_output(&out(sigmoid)) {
            continue;
        }
        let gr = readers(&out(sigmoid));
        if gr.len() != 1 || gr[0].name != last.name || other(last, x) != Some(out(sigmoid)) {
            continue;
        }
        // They are removed by name, so each name must be one node's.
        let unique = |n: &str| !n.is_empty() && g.node.iter().filter(|k| k.name == n).count() == 1;
        if ![&scale.name, &sigmoid.name, &last.name]
            .iter()
            .all(|n| unique(n))
        {
            return Ok(None);
        }
        return Ok(Some(QuickGelu {
            alpha,
            output: out(last),
            nodes: vec![scale.name.clone(), sigmoid.name.clone(), last.name.clone()],
        }));
    }
    Ok(None)
}

/// The last-axis `Slice`s that are all that read a fused layer's output, to become its outputs.
struct ColumnSlices {
    /// The distinct ranges, flat: `s0, e0, s1, e1, ..`.
    columns: Vec<i64>,
    /// One output per range: the first slice's output of that range.
    outputs: Vec<String>,
    /// Each slice's output and the output that now holds its values.
    renamed: Vec<(String, String)>,
}

impl ColumnSlices {
    /// Remove the slices from `g`, their readers reading the layer's outputs.
    fn absorb(self, g: &mut pb::GraphProto) {
        let names: std::collections::HashMap<&str, &str> = self
            .renamed
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        g.node.retain(|k| {
            !(k.op_type == "Slice" && k.output.first().is_some_and(|o| names.contains_key(&**o)))
        });
        for k in &mut g.node {
            for i in &mut k.input {
                if let Some(to) = names.get(i.as_str()) {
                    *i = to.to_string();
                }
            }
        }
    }
}

/// The slices of `value` (`[rows, width]`, the output of an int8 layer) if every node reading
/// it is a `Slice` of axis 1 or -1 with constant single bounds and no step other than 1, and
/// neither `value` nor a slice is a graph output; else `None` (the layer keeps its one output).
fn column_slices(
    g: &pb::GraphProto,
    value: &str,
    width: usize,
) -> Result<Option<ColumnSlices>, OnnxError> {
    if is_graph_output(g, value) {
        return Ok(None);
    }
    let readers = readers(g, value);
    if readers.is_empty() {
        return Ok(None);
    }
    let constant = |name: Option<&String>| -> Result<Option<i64>, OnnxError> {
        let Some(t) = name.and_then(|n| initializer(g, n)) else {
            return Ok(None);
        };
        Ok(match i64s(t)?.as_slice() {
            [v] => Some(*v),
            _ => None,
        })
    };
    let w = width as i64;
    let mut out = ColumnSlices {
        columns: Vec::new(),
        outputs: Vec::new(),
        renamed: Vec::new(),
    };
    for k in readers {
        if k.op_type != "Slice" || k.input.first().map(String::as_str) != Some(value) {
            return Ok(None);
        }
        let (Some(start), Some(end), Some(axis)) = (
            constant(k.input.get(1))?,
            constant(k.input.get(2))?,
            constant(k.input.get(3))?,
        ) else {
            return Ok(None);
        };
        let step = match k.input.get(4).filter(|s| !s.is_empty()) {
            Some(s) => constant(Some(s))?,
            None => Some(1),
        };
        if !(axis == 1 || axis == -1) || step != Some(1) {
            return Ok(None);
        }
        // ONNX Slice bounds: negative from the end, then clamped to the axis.
        let clamp = |v: i64| (if v < 0 { v + w } else { v }).clamp(0, w);
        let (start, end) = (clamp(start), clamp(end));
        if start >= end {
            return Ok(None);
        }
        // A graph output keeps its own node (a renamed one would name nothing).
        let Some(output) = k.output.first().filter(|o| !is_graph_output(g, o)) else {
            return Ok(None);
        };
        let at = out.columns.chunks_exact(2).position(|c| c == [start, end]);
        let to = match at {
            Some(i) => out.outputs[i].clone(),
            None => {
                out.columns.extend([start, end]);
                out.outputs.push(output.clone());
                output.clone()
            }
        };
        out.renamed.push((output.clone(), to));
    }
    Ok(Some(out))
}

/// The f32 replacement of an int8 layer: `MatMul(input, weight_deq)`, plus `Add(bias_deq)` when
/// it has a bias (its constant added to `g`), writing `output`.
fn f32_nodes(
    g: &mut pb::GraphProto,
    site: &QuantSite,
    wname: String,
    output: &str,
) -> Vec<pb::NodeProto> {
    let n = &site.name;
    let node = |input: Vec<String>, output: &str, name: String, op: &str| pb::NodeProto {
        input,
        output: vec![output.to_string()],
        name,
        op_type: op.into(),
        ..Default::default()
    };
    match site.scales.bias() {
        Some(b) => {
            let bname = format!("{n}.bias_deq");
            g.initializer
                .push(f32_tensor(&bname, vec![site.out_dim as i64], &b));
            let mm = format!("{n}.mm");
            vec![
                node(
                    vec![site.input.clone(), wname],
                    &mm,
                    format!("{mm}/node"),
                    "MatMul",
                ),
                node(vec![mm, bname], output, format!("{n}.bias_add/node"), "Add"),
            ]
        }
        None => vec![node(
            vec![site.input.clone(), wname],
            output,
            format!("{n}.mm/node"),
            "MatMul",
        )],
    }
}

/// The element type an int8 layer's product is computed in by [`widened_int8_matmuls`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Widening {
    /// `MatMul(Cast<i32>(x_q), Cast<i32>(W_q))`: the same exact i32 accumulator.
    I32,
    /// `MatMul(Cast<f32>(x_q), Cast<f32>(W_q))` on f32 kernels, its bias (if any) added in f32,
    /// the layer's `Cast` to f32 then a no-op. Each product of two int8 values is exact in f32,
    /// and so is every partial sum below 2^24: with |x_q|, |w_q| <= 128 that holds for any
    /// inner size up to 1,024 (ViT-B/16's 768). The bias add then rounds the same exact sum
    /// once, as the i32 form's `Cast` does, so the layer is bit-identical while |bias_q| <= 2^24
    /// too. A 3,072-wide layer (ViT-B/16's MLP output) differs only where a partial sum passes
    /// 2^24, and then by accumulated f32 rounding: at the extreme (3,072 products of 127·127, all
    /// of one sign) a relative 4e-5, far inside the int8 tolerance.
    F32,
}

/// The model with every int8 layer's `MatMulInteger(x_q, W_q, 0, 0)` computed as a `MatMul` of
/// the int8 values widened to `to` (zero points are 0, so the widened product is the i32
/// accumulator; see [`Widening`] for f32). The weights are widened here, as constants (four
/// times the int8 bytes in memory, as much as f32): tract folds a `Cast` of a constant only
/// when its output stays under 4 MiB, so ViT-B/16's MLP weights would otherwise be cast and
/// packed again at every step. tract runs the product on its i32 or f32 kernels, where on x86-64
/// without VNNI its i8 path is about 29 times slower (docs/device.md).
/// Untouched when the model has no int8 layer.
pub fn widened_int8_matmuls(m: &pb::ModelProto, to: Widening) -> Result<pb::ModelProto, OnnxError> {
    let sites = quant_sites(m)?;
    let mut out = m.clone();
    let g = out.graph.as_mut().expect("quant_sites checked the graph");
    let (wide, suffix) = match to {
        Widening::I32 => (INT32, "i32"),
        Widening::F32 => (FLOAT, "f32"),
    };
    for site in &sites {
        let names = SiteNames::new(site.name.clone());
        let (xq, wq) = (names.x_q(), names.weight_q());
        let pos = g
            .node
            .iter()
            .position(|k| {
                k.op_type == "MatMulInteger"
                    && k.input.first() == Some(&xq)
                    && k.input.get(1) == Some(&wq)
            })
            .ok_or_else(|| site_error(&site.name, format!("no MatMulInteger reading {xq}")))?;
        let acc = g.node[pos].output.first().cloned().unwrap_or_default();
        let (xw, ww) = (format!("{xq}.{suffix}"), format!("{wq}.{suffix}"));
        let matmul = pb::NodeProto {
            input: vec![xw.clone(), ww.clone()],
            output: vec![acc.clone()],
            name: format!("{acc}/node"),
            op_type: "MatMul".into(),
            ..Default::default()
        };
        let w = initializer(g, &wq).ok_or_else(|| site_error(&site.name, "no weight"))?;
        let (dims, values) = (w.dims.clone(), i8s(w)?);
        g.initializer.push(pb::TensorProto {
            dims,
            data_type: wide,
            name: ww,
            raw_data: match to {
                Widening::I32 => values
                    .iter()
                    .flat_map(|&v| i32::from(v).to_le_bytes())
                    .collect(),
                Widening::F32 => values
                    .iter()
                    .flat_map(|&v| f32::from(v).to_le_bytes())
                    .collect(),
            },
            ..Default::default()
        });
        g.node
            .splice(pos..=pos, [super::cast_node(&xq, &xw, wide), matmul]);
        if let (Widening::F32, Some(b)) = (to, &site.scales.bias_q) {
            // The bias is added to an f32 accumulator: an f32 copy of it.
            let (bq, bf) = (names.bias_q(), format!("{}.f32", names.bias_q()));
            let add = g
                .node
                .iter_mut()
                .find(|k| k.op_type == "Add" && k.input.first() == Some(&acc))
                .ok_or_else(|| site_error(&site.name, format!("no Add of {bq}")))?;
            add.input[1] = bf.clone();
            let b: Vec<f32> = b.iter().map(|&v| v as f32).collect();
            g.initializer
                .push(f32_tensor(&bf, vec![b.len() as i64], &b));
        }
    }
    drop_unread_initializers(g);
    Ok(out)
}

/// Remove the constants no node reads any more.
fn drop_unread_initializers(g: &mut pb::GraphProto) {
    let used: std::collections::HashSet<String> = g
        .node
        .iter()
        .flat_map(|n| n.input.iter().cloned())
        .collect();
    g.initializer.retain(|t| used.contains(&t.name));
}

#[cfg(test)]
mod tests {
    use super::super::to_model_proto;
    use super::*;
    use pe_clip_calibrate::graph::Graph;
    use pe_clip_calibrate::graph::{ElemType, LinearOpts};
    use pe_clip_calibrate::int8::{quantize, LinearRanges};
    use std::collections::HashMap;

    /// One linear layer with a bias, and one without, quantized as the exporter does.
    fn quantized(per_channel: bool) -> pb::ModelProto {
        let mut g = Graph::new("t");
        let x = g.input("x", ElemType::F32, &[1, 3]);
        let w: Vec<f32> = (0..6).map(|k| k as f32 * 0.3 - 0.8).collect();
        let a = g.linear(
            &x,
            "a",
            &w,
            2,
            3,
            LinearOpts {
                bias: Some(&[0.25, -0.5]),
                quantizable: true,
            },
        );
        let b = g.linear(
            &a,
            "b",
            &[1.0, -2.0],
            1,
            2,
            LinearOpts {
                bias: None,
                quantizable: true,
            },
        );
        g.output(&b, "y", ElemType::F32, Some(&[1, 1]));
        let ranges = HashMap::from([
            ("a".to_string(), LinearRanges { input: 2.0 }),
            ("b".to_string(), LinearRanges { input: 3.0 }),
        ]);
        to_model_proto(&quantize(&g, &ranges, per_channel).0, &[])
    }

    fn initializer_f32(m: &pb::ModelProto, name: &str) -> Vec<f32> {
        f32s(initializer(m.graph.as_ref().unwrap(), name).unwrap()).unwrap()
    }

    /// The int8 layers are found with their inputs and scales; new scales are written in place;
    /// the dequantized model computes `x·(W_q·s_w) + b_q·r` with plain MatMul and Add.
    #[test]
    fn sites_are_found_rescaled_and_dequantized() {
        for per_channel in [false, true] {
            let mut m = quantized(per_channel);
            let sites = quant_sites(&m).unwrap();
            assert_eq!(
                sites.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
                ["a", "b"]
            );
            let a = &sites[0];
            assert_eq!((a.input.as_str(), a.in_dim, a.out_dim), ("x", 3, 2));
            assert!((a.scales.threshold() - 2.0).abs() < 1e-6);
            assert!(a.scales.bias_q.is_some() && sites[1].scales.bias_q.is_none());
            let d = dequantized(&m).unwrap();
            let g = d.graph.as_ref().unwrap();
            assert!(!g.node.iter().any(|n| n.op_type.contains("Integer")
                || n.op_type == "QuantizeLinear"
                || n.op_type == "Cast"));
            assert_eq!(g.node.iter().filter(|n| n.op_type == "MatMul").count(), 2);
            let w = initializer_f32(&d, "a.weight_deq");
            let wq = i8s(initializer(m.graph.as_ref().unwrap(), "a.weight_q").unwrap()).unwrap();
            let sw = a.scales.weight_scales();
            for (k, (v, q)) in w.iter().zip(&wq).enumerate() {
                let s = sw[if per_channel { k % 2 } else { 0 }];
                assert!((v - *q as f32 * s).abs() < 1e-7);
            }
            let bias = initializer_f32(&d, "a.bias_deq");
            for (v, want) in bias.iter().zip([0.25f32, -0.5]) {
                assert!((v - want).abs() < 1e-3, "{bias:?}");
            }
            // The output keeps its name, so the rest of the graph is untouched.
            assert!(g.node.iter().any(|n| n.op_type == "Add"
                && n.output.first()
                    == m.graph
                        .as_ref()
                        .unwrap()
                        .node
                        .iter()
                        .find(|k| k.op_type == "Mul")
                        .and_then(|k| k.output.first())));
            // New scales land in the same constants and read back.
            let wider = a.scales.with_threshold(4.0);
            set_site_scales(&mut m, "a", &wider).unwrap();
            assert_eq!(quant_sites(&m).unwrap()[0].scales, wider);
            assert!(set_site_scales(&mut m, "nope", &wider).is_err());
        }
    }

    #[test]
    fn a_quantize_node_pe_clip_did_not_write_is_named() {
        let mut m = quantized(false);
        let g = m.graph.as_mut().unwrap();
        g.initializer.retain(|t| t.name != "a.rescale");
        let e = quant_sites(&m).unwrap_err().to_string();
        assert!(e.contains("a.rescale"), "{e}");
        let g = m.graph.as_mut().unwrap();
        g.node[0].input[1] = "mystery".into();
        let e = quant_sites(&m).unwrap_err().to_string();
        assert!(e.contains("not written by pe-clip"), "{e}");
    }

    /// A consistent-looking but foreign int8 model whose constants disagree in size is refused
    /// with the layer and the sizes named, before anything indexes them (`dequantized` used to
    /// index a short per-column rescale out of bounds).
    #[test]
    fn constants_of_the_wrong_size_are_refused_by_name() {
        fn set_raw(m: &mut pb::ModelProto, name: &str, raw: Vec<u8>, dims: Vec<i64>) {
            let g = m.graph.as_mut().unwrap();
            let t = g.initializer.iter_mut().find(|t| t.name == name).unwrap();
            t.raw_data = raw;
            t.dims = dims;
        }
        let f32_raw = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        // `a` has 2 output columns: a 3-value per-column rescale (the wrong width).
        let mut m = quantized(true);
        set_raw(&mut m, "a.rescale", f32_raw(&[0.1, 0.1, 0.1]), vec![3]);
        for e in [quant_sites(&m).unwrap_err(), dequantized(&m).unwrap_err()].map(|e| e.to_string())
        {
            assert!(
                e.contains("int8 layer a") && e.contains("rescale has 3"),
                "{e}"
            );
        }
        // `b` has 1 output column and 2 inputs: a weight with one value missing.
        let mut m = quantized(false);
        set_raw(&mut m, "b.weight_q", vec![1], vec![2, 1]);
        let e = dequantized(&m).unwrap_err().to_string();
        assert!(e.contains("int8 layer b") && e.contains("1 values"), "{e}");
        // A bias longer than the output.
        let mut m = quantized(false);
        set_raw(&mut m, "a.bias_q", vec![0; 12], vec![3]);
        let e = quant_sites(&m).unwrap_err().to_string();
        assert!(e.contains("bias has 3 values for 2"), "{e}");
        // A weight that is not 2-D.
        let mut m = quantized(false);
        set_raw(&mut m, "a.weight_q", vec![0; 6], vec![6]);
        assert!(quant_sites(&m)
            .unwrap_err()
            .to_string()
            .contains("not [in, out]"));
    }

    /// At ViT-B/16's inner size 768, with the sums as large as int8 allows (every product
    /// +-127·127, all of one sign, plus a bias), the f32 form still equals the int8 one bit for
    /// bit: its bound (inner size <= 1,024) is where every partial sum stays exact.
    #[test]
    fn f32_widening_is_exact_at_the_largest_sums_of_a_768_wide_layer() {
        let (inner, out) = (768, 8);
        let mut seed = 1u32;
        let mut rand = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
        };
        // Output 0: all weights +1 (each +127 after quantizing); the others random.
        let w: Vec<f32> = (0..out * inner)
            .map(|k| if k < inner { 1.0 } else { rand() })
            .collect();
        // Rows 0 and 1: every input at +-range (x_q = +-127); rows 2 and 3 random.
        let x: Vec<f32> = (0..4 * inner)
            .map(|k| match k / inner {
                0 => 1.0,
                1 => -1.0,
                _ => rand(),
            })
            .collect();
        let bias: Vec<f32> = (0..out).map(|o| o as f32 * 0.37 - 1.1).collect();
        let mut g = Graph::new("wide");
        let xi = g.input("x", ElemType::F32, &[4, inner]);
        let y = g.linear(
            &xi,
            "l",
            &w,
            out,
            inner,
            LinearOpts {
                bias: Some(&bias),
                quantizable: true,
            },
        );
        g.output(&y, "y", ElemType::F32, Some(&[4, out]));
        let ranges = HashMap::from([("l".to_string(), LinearRanges { input: 1.0 })]);
        for per_channel in [false, true] {
            let m = to_model_proto(&quantize(&g, &ranges, per_channel).0, &[]);
            let run = |m: &pb::ModelProto| super::super::run_once(m, &[4, inner], &x);
            let native = run(&m);
            // The extreme row really reaches 127·127·768 before rescaling.
            let site = &quant_sites(&m).unwrap()[0];
            let acc =
                native[0] / site.scales.rescale[0] - site.scales.bias_q.as_ref().unwrap()[0] as f32;
            assert!(
                (acc - (127 * 127 * inner) as f32).abs() < 1e3,
                "accumulator {acc}"
            );
            let f = widened_int8_matmuls(&m, Widening::F32).unwrap();
            assert_eq!(native, run(&f), "per_channel {per_channel}");
        }
    }

    /// The widened models compute the very same outputs as the int8 one (exact i32 products;
    /// exact f32 ones at this inner size), per tensor and per column.
    #[test]
    fn widened_int8_matmuls_give_identical_outputs() {
        let run = |m: &pb::ModelProto| super::super::run_once(m, &[1, 3], &[0.7, -1.9, 1.3]);
        for (per_channel, to) in [false, true]
            .into_iter()
            .flat_map(|p| [(p, Widening::I32), (p, Widening::F32)])
        {
            let m = quantized(per_channel);
            let w = widened_int8_matmuls(&m, to).unwrap();
            let ops = |m: &pb::ModelProto, op: &str| {
                m.graph
                    .as_ref()
                    .unwrap()
                    .node
                    .iter()
                    .filter(|n| n.op_type == op)
                    .count()
            };
            assert_eq!((ops(&m, "MatMulInteger"), ops(&w, "MatMulInteger")), (2, 0));
            assert_eq!(ops(&w, "MatMul"), 2);
            assert_eq!(run(&m), run(&w), "per_channel {per_channel}, {to:?}");
        }
        // A model without int8 layers is returned as it is.
        let mut g = Graph::new("f");
        let x = g.input("x", ElemType::F32, &[1, 2]);
        let y = g.linear(&x, "l", &[1.0, 2.0], 1, 2, LinearOpts::default());
        g.output(&y, "y", ElemType::F32, Some(&[1, 1]));
        let f = to_model_proto(&g, &[]);
        assert_eq!(widened_int8_matmuls(&f, Widening::F32).unwrap(), f);
    }
}

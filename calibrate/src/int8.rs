//! The int8 rewrite of a step graph's linear layers (the recipe in [`quantize`]), from the
//! calibrated input ranges.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::graph::{Attr, Constant, Data, ElemType, Graph, LinearLayer, Node};
use crate::quant::{quantize_value, scale_for};
use crate::site::SiteNames;

/// Calibrated range of one linear layer: the largest input magnitude its int8 input is scaled
/// to (the observer's threshold).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinearRanges {
    pub input: f32,
}

/// What [`quantize`] did to one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantizedLayer {
    pub name: String,
    pub input_scale: f32,
    /// The weight scale (the largest one with per-channel scales).
    pub weight_scale: f32,
    /// Whether the bias was folded into the integer accumulator.
    pub bias_folded: bool,
}

/// Rewrite every quantizable linear layer that has `ranges` into the integer form tract runs
/// fast:
///
/// ```text
/// x ─ QuantizeLinear(s_x, 0) ─ MatMulInteger(W_q) ─ Add(b_q, i32) ─ Cast(f32) ─ Mul(s_x·s_w) ─ y
/// ```
///
/// Signed int8 activations and weights at zero point 0, the bias folded into the `i32`
/// accumulator (`b_q = round(b / (s_x·s_w))`), and one scale per weight tensor: tract folds the
/// bias add into its int8 matmul kernel, the cast and the scalar rescale are one cheap pass each,
/// and the output is not rounded to int8 again. The rest of the graph (attention products,
/// softmax, norms, activations, the recurrent cell) stays f32.
///
/// With `per_channel`, each output column gets its own weight scale and the rescale is a
/// per-column `Mul` (more precise weights; tract does not fuse that `Mul`, so it is slower).
pub fn quantize(
    graph: &Graph,
    ranges: &HashMap<String, LinearRanges>,
    per_channel: bool,
) -> (Graph, Vec<QuantizedLayer>) {
    let mut g = graph.clone();
    g.constants.push(Constant {
        name: ZERO_POINT.to_string(),
        dims: Vec::new(),
        data: Data::I8(vec![0]),
    });
    let layers = g.linears.clone();
    let done = layers
        .iter()
        .filter(|l| l.quantizable)
        .filter_map(|layer| {
            let r = ranges.get(&layer.name)?;
            quantize_layer(&mut g, layer, r.input, per_channel)
        })
        .collect();
    drop_unread_constants(&mut g);
    (g, done)
}

/// The shared int8 zero point (0) of every quantized layer.
const ZERO_POINT: &str = "q/zero_point";

/// Rewrite one layer in `g` (whose input magnitude reaches `input_absmax`); `None` when the
/// graph has no f32 MatMul or weight of that layer to rewrite.
fn quantize_layer(
    g: &mut Graph,
    layer: &LinearLayer,
    input_absmax: f32,
    per_channel: bool,
) -> Option<QuantizedLayer> {
    let pos = g
        .nodes
        .iter()
        .position(|n| n.op == "MatMul" && n.outputs.first() == Some(&layer.matmul_out))?;
    let wi = g.constants.iter().position(|c| c.name == layer.weight)?;
    let Data::F32(w) = &g.constants[wi].data else {
        return None;
    };
    let n_out = layer.out_dim;
    let sw = weight_scales(w, n_out, per_channel);
    let wq: Vec<i8> = w
        .iter()
        .enumerate()
        .map(|(k, &v)| quantize_value(v, sw[if per_channel { k % n_out } else { 0 }]))
        .collect();
    let sx = scale_for(input_absmax);
    let bias_values = absorbable_bias(g, layer);
    let final_out = match &bias_values {
        Some((bi, _)) => g.nodes[*bi].outputs[0].clone(),
        None => layer.matmul_out.clone(),
    };
    let names = SiteNames::new(layer.name.clone());
    g.constants[wi] = Constant {
        name: names.weight_q(),
        dims: g.constants[wi].dims.clone(),
        data: Data::I8(wq),
    };
    let push = |g: &mut Graph, name: String, dims: Vec<usize>, data: Data| {
        g.constants.push(Constant { name, dims, data });
    };
    push(g, names.x_scale(), Vec::new(), Data::F32(vec![sx]));
    let rescale: Vec<f32> = sw.iter().map(|s| s * sx).collect();
    let rescale_dims = if per_channel { vec![n_out] } else { Vec::new() };
    push(g, names.rescale(), rescale_dims, Data::F32(rescale.clone()));
    let bias_q = bias_values.as_ref().map(|(_, b)| {
        let bq: Vec<i32> = b
            .iter()
            .enumerate()
            .map(|(j, &v)| {
                let s = rescale[if per_channel { j } else { 0 }];
                (v as f64 / s as f64)
                    .round()
                    .clamp(i32::MIN as f64 / 2.0, i32::MAX as f64 / 2.0) as i32
            })
            .collect();
        push(g, names.bias_q(), vec![n_out], Data::I32(bq));
    });
    let replacement = integer_nodes(&names, &layer.input, bias_q.is_some(), &final_out);
    if let Some((bi, _)) = &bias_values {
        // Remove the absorbed Add (after the MatMul, so `pos` stays valid).
        debug_assert!(*bi > pos);
        g.nodes.remove(*bi);
    }
    g.nodes.splice(pos..=pos, replacement);
    Some(QuantizedLayer {
        name: layer.name.clone(),
        input_scale: sx,
        weight_scale: sw.iter().fold(0f32, |m, &v| m.max(v)),
        bias_folded: bias_values.is_some(),
    })
}

/// Weight scales of an `[in, out]` weight: one for the tensor, or one per output column.
fn weight_scales(w: &[f32], n_out: usize, per_channel: bool) -> Vec<f32> {
    if per_channel {
        let mut col = vec![0f32; n_out];
        for row in w.chunks_exact(n_out) {
            for (c, v) in col.iter_mut().zip(row) {
                *c = c.max(v.abs());
            }
        }
        col.into_iter().map(scale_for).collect()
    } else {
        vec![scale_for(w.iter().fold(0f32, |m, v| m.max(v.abs())))]
    }
}

/// The bias Add that reads the layer's matmul output directly, with a constant f32 vector as
/// its other operand: its node index and values, to be absorbed into the accumulator. `None`
/// when there is none, or when anything else also reads the matmul output.
fn absorbable_bias(g: &Graph, layer: &LinearLayer) -> Option<(usize, Vec<f32>)> {
    let n_out = layer.out_dim;
    let bias = g.nodes.iter().position(|n| {
        n.op == "Add"
            && n.inputs.len() == 2
            && n.inputs[0] == layer.matmul_out
            && g.constants.iter().any(|c| {
                c.name == n.inputs[1] && c.dims == [n_out] && matches!(c.data, Data::F32(_))
            })
    });
    let other_readers = g
        .nodes
        .iter()
        .enumerate()
        .any(|(k, n)| Some(k) != bias && n.inputs.iter().any(|i| i == &layer.matmul_out))
        || g.outputs.iter().any(|o| o.name == layer.matmul_out);
    if other_readers {
        return None;
    }
    let bi = bias?;
    let c = g
        .constants
        .iter()
        .find(|c| c.name == g.nodes[bi].inputs[1])
        .expect("checked above");
    let Data::F32(b) = &c.data else {
        unreachable!("checked above")
    };
    Some((bi, b.clone()))
}

/// `QuantizeLinear → MatMulInteger → [Add(b_q)] → Cast(f32) → Mul(rescale)` from `input` to
/// `output`, over the site's constants.
fn integer_nodes(names: &SiteNames, input: &str, with_bias: bool, output: &str) -> Vec<Node> {
    let node = |op: &str, inputs: Vec<String>, output: &str, attrs: Vec<(String, Attr)>| Node {
        op: op.into(),
        name: format!("{output}/node"),
        inputs,
        outputs: vec![output.to_string()],
        attrs,
    };
    let zp = ZERO_POINT.to_string();
    let (xq, acc, accb, accf) = (names.x_q(), names.acc(), names.acc_bias(), names.acc_f32());
    let mut nodes = vec![
        node(
            "QuantizeLinear",
            vec![input.to_string(), names.x_scale(), zp.clone()],
            &xq,
            Vec::new(),
        ),
        node(
            "MatMulInteger",
            vec![xq.clone(), names.weight_q(), zp.clone(), zp],
            &acc,
            Vec::new(),
        ),
    ];
    let mut acc_out = acc.clone();
    if with_bias {
        nodes.push(node("Add", vec![acc, names.bias_q()], &accb, Vec::new()));
        acc_out = accb;
    }
    nodes.push(node(
        "Cast",
        vec![acc_out],
        &accf,
        vec![("to".into(), Attr::Int(ElemType::F32.onnx_code() as i64))],
    ));
    nodes.push(node("Mul", vec![accf, names.rescale()], output, Vec::new()));
    nodes
}

/// Drop constants no node reads any more (the absorbed f32 biases).
fn drop_unread_constants(g: &mut Graph) {
    let used: HashSet<&str> = g
        .nodes
        .iter()
        .flat_map(|n| n.inputs.iter().map(String::as_str))
        .collect();
    let keep: Vec<Constant> = g
        .constants
        .iter()
        .filter(|c| used.contains(c.name.as_str()))
        .cloned()
        .collect();
    g.constants = keep;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::LinearOpts;

    #[test]
    fn quantize_replaces_only_quantizable_layers_with_ranges() {
        let mut g = Graph::new("t");
        let x = g.input("x", ElemType::F32, &[1, 2]);
        let a = g.linear(
            &x,
            "a",
            &[1.0, -2.0, 0.5, 0.25],
            2,
            2,
            LinearOpts {
                bias: Some(&[0.5, -1.0]),
                quantizable: true,
            },
        );
        let b = g.linear(&a, "b", &[1.0, 0.0, 0.0, 1.0], 2, 2, LinearOpts::default());
        g.output(&b, "y", ElemType::F32, Some(&[1, 2]));
        let ranges = HashMap::from([
            ("a".to_string(), LinearRanges { input: 1.27 }),
            ("b".to_string(), LinearRanges { input: 1.0 }),
        ]);
        let (q, done) = quantize(&g, &ranges, false);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].name, "a");
        assert!(done[0].bias_folded);
        assert!((done[0].weight_scale - 2.0 / 127.0).abs() < 1e-9);
        assert!((done[0].input_scale - 0.01).abs() < 1e-9);
        assert_eq!(q.count_op("MatMulInteger"), 1);
        assert_eq!(q.count_op("MatMul"), 1);
        // The f32 bias Add of `a` became the integer accumulator Add.
        assert_eq!(q.count_op("Add"), 1);
        let wq = q.constant_named("a.weight_q").unwrap();
        // [in, out] = [[1, 0.5], [-2, 0.25]] at scale 2/127.
        assert_eq!(wq.data, Data::I8(vec![64, 32, -127, 16]));
        assert!(q.constant_named("a.weight").is_none());
        assert!(q.constant_named("a.bias").is_none());
        // b / (s_x s_w) = 0.5 / (0.01 * 2/127) = 3175, -1 -> -6350.
        assert_eq!(
            q.constant_named("a.bias_q").unwrap().data,
            Data::I32(vec![3175, -6350])
        );
        // The rescaled output keeps the bias Add's output name, so the consumers are untouched.
        let mul = q.nodes.iter().find(|n| n.op == "Mul").unwrap();
        assert_eq!(mul.outputs[0], q.linears[1].input);
    }
}

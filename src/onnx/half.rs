//! f16 step models: every linear layer (a `MatMul` by a constant weight) computed in f16, the
//! rest in f32; and the way back to f32 products for CPUs without f16 arithmetic.
//!
//! An f16 linear layer is `Cast<f16>(x) → MatMul(·, W as f16) → Cast<f32>`: the weights are
//! stored as f16 (half the bytes), the product runs on f16 kernels where the machine has them
//! (Armv8.2 FP16, GPUs). LayerNorm, softmax, GELU, the recurrent cells' gates and states, the
//! attention products (activation by activation) and the residual stream stay f32, because they
//! carry sums and exponentials whose range or cancellation f16 loses (docs/device.md has the
//! measured agreement).

use super::{cast_node as cast, pb};
use crate::error::OnnxError;

const FLOAT: i32 = 1;
const FLOAT16: i32 = 10;

fn f32_values(t: &pb::TensorProto) -> Result<Vec<f32>, OnnxError> {
    let bad = |why: &str| OnnxError::Tensor {
        tensor: t.name.clone(),
        reason: why.to_string(),
    };
    if !t.raw_data.is_empty() {
        if !t.raw_data.len().is_multiple_of(4) {
            return Err(bad("raw f32 data not a multiple of 4 bytes"));
        }
        return Ok(t
            .raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect());
    }
    Ok(t.float_data.clone())
}

/// The model with every `MatMul` whose second operand is a 2-D f32 constant computed in f16
/// (see the module), and how many there were. The inputs, outputs and every other operator keep
/// f32.
pub fn f16_linears(m: &pb::ModelProto) -> Result<(pb::ModelProto, usize), OnnxError> {
    use tract_onnx::prelude::f16;
    let mut out = m.clone();
    let g = out.graph.as_mut().ok_or(OnnxError::NoGraph)?;
    let weights: std::collections::HashMap<String, usize> = g
        .initializer
        .iter()
        .enumerate()
        .filter(|(_, t)| t.data_type == FLOAT && t.dims.len() == 2)
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    let mut nodes = Vec::with_capacity(g.node.len());
    let mut halved: std::collections::HashMap<String, String> = Default::default();
    let mut cast_inputs: std::collections::HashSet<String> = Default::default();
    let mut count = 0;
    for node in std::mem::take(&mut g.node) {
        let weight = (node.op_type == "MatMul")
            .then(|| node.input.get(1).and_then(|w| weights.get(w)))
            .flatten();
        let (Some(&wi), Some(x), Some(y)) = (weight, node.input.first(), node.output.first())
        else {
            nodes.push(node);
            continue;
        };
        let w = &g.initializer[wi];
        let w16 = match halved.get(&w.name) {
            Some(n) => n.clone(),
            None => {
                let name = format!("{}.f16", w.name);
                let raw = f32_values(w)?
                    .into_iter()
                    .flat_map(|v| f16::from_f32(v).to_bits().to_le_bytes())
                    .collect();
                let t = pb::TensorProto {
                    dims: w.dims.clone(),
                    data_type: FLOAT16,
                    name: name.clone(),
                    raw_data: raw,
                    ..Default::default()
                };
                halved.insert(w.name.clone(), name.clone());
                g.initializer.push(t);
                name
            }
        };
        // One cast per activation, however many layers read it (q, k and v read one).
        let x16 = format!("{x}.f16");
        if cast_inputs.insert(x.clone()) {
            nodes.push(cast(x, &x16, FLOAT16));
        }
        let y16 = format!("{y}.f16");
        nodes.push(pb::NodeProto {
            input: vec![x16, w16],
            output: vec![y16.clone()],
            name: node.name.clone(),
            op_type: "MatMul".into(),
            ..Default::default()
        });
        nodes.push(cast(&y16, y, FLOAT));
        count += 1;
    }
    g.node = nodes;
    let used: std::collections::HashSet<&String> = g.node.iter().flat_map(|n| &n.input).collect();
    let keep: Vec<bool> = g
        .initializer
        .iter()
        .map(|t| used.contains(&t.name))
        .collect();
    let mut keep = keep.into_iter();
    g.initializer.retain(|_| keep.next().unwrap_or(true));
    Ok((out, count))
}

/// An f16 model with f32 products again, for CPUs without f16 arithmetic (x86, Armv8.0), whose
/// tract has no fast f16 kernel: the f16 weights widened to f32 (the same values), the casts to
/// f16 dropped (`Identity`), so each layer is an f32 product with f16-rounded weights. A model
/// with no f16 constant is returned as it is.
pub fn widened_f16(m: &pb::ModelProto) -> Result<pb::ModelProto, OnnxError> {
    use tract_onnx::prelude::f16;
    let mut out = m.clone();
    let g = out.graph.as_mut().ok_or(OnnxError::NoGraph)?;
    for t in g.initializer.iter_mut().filter(|t| t.data_type == FLOAT16) {
        if t.raw_data.is_empty() || !t.raw_data.len().is_multiple_of(2) {
            return Err(OnnxError::Tensor {
                tensor: t.name.clone(),
                reason: "f16 constant without an even number of raw bytes".into(),
            });
        }
        t.raw_data = t
            .raw_data
            .chunks_exact(2)
            .flat_map(|b| {
                f16::from_bits(u16::from_le_bytes([b[0], b[1]]))
                    .to_f32()
                    .to_le_bytes()
            })
            .collect();
        t.data_type = FLOAT;
    }
    for n in g.node.iter_mut().filter(|n| {
        n.op_type == "Cast"
            && n.attribute
                .iter()
                .any(|a| a.name == "to" && a.i == i64::from(FLOAT16))
    }) {
        n.op_type = "Identity".into();
        n.attribute.clear();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pe_clip_calibrate::graph::{ElemType, Graph, LinearOpts};
    use tract_onnx::prelude::f16;

    /// x [2, 4] → q, k (both reading x) → q + k → out: three linear layers, two sharing an input.
    fn model(w: impl Fn(usize) -> f32) -> pb::ModelProto {
        let mut g = Graph::new("h");
        let x = g.input("x", ElemType::F32, &[2, 4]);
        let lin = |g: &mut Graph, x: &str, name: &str, o: usize, i: usize, seed: usize| {
            let w: Vec<f32> = (0..o * i).map(|k| w(k + seed)).collect();
            g.linear(
                x,
                name,
                &w,
                o,
                i,
                LinearOpts {
                    bias: Some(&vec![0.125; o]),
                    quantizable: true,
                },
            )
        };
        let q = lin(&mut g, &x, "q", 3, 4, 0);
        let k = lin(&mut g, &x, "k", 3, 4, 100);
        let s = g.add(&q, &k);
        let y = lin(&mut g, &s, "out", 2, 3, 200);
        g.output(&y, "y", ElemType::F32, Some(&[2, 2]));
        super::super::to_model_proto(&g, &[])
    }

    fn run(m: &pb::ModelProto) -> Vec<f32> {
        let x: Vec<f32> = (0..8).map(|k| (k as f32 * 0.37).sin()).collect();
        super::super::run_once(m, &[2, 4], &x)
    }

    fn count(m: &pb::ModelProto, op: &str) -> usize {
        m.graph
            .as_ref()
            .unwrap()
            .node
            .iter()
            .filter(|n| n.op_type == op)
            .count()
    }

    /// Every linear layer becomes an f16 product with f16 weights (one cast per activation);
    /// its answers are within f16 rounding of f32's; widened back, the model is the f32 model
    /// of the f16-rounded weights, to f32 rounding.
    #[test]
    fn linear_layers_go_to_f16_and_back() {
        let w = |k: usize| ((k * 7919) % 97) as f32 / 48.5 - 1.0;
        let m = model(w);
        let (h, n) = f16_linears(&m).unwrap();
        assert_eq!(n, 3);
        let g = h.graph.as_ref().unwrap();
        let halves = g
            .initializer
            .iter()
            .filter(|t| t.data_type == FLOAT16)
            .count();
        assert_eq!(halves, 3);
        assert!(g
            .initializer
            .iter()
            .all(|t| t.data_type != FLOAT || t.dims.len() < 2));
        // Casts: x once (q and k share it), the sum, and one back to f32 per layer.
        assert_eq!(count(&h, "Cast"), 2 + 3);
        let (f, hv) = (run(&m), run(&h));
        for (a, b) in f.iter().zip(&hv) {
            assert!((a - b).abs() <= 2e-2 * a.abs().max(1.0), "{f:?} vs {hv:?}");
        }
        assert_ne!(f, hv, "f16 rounding shows");
        let widened = widened_f16(&h).unwrap();
        assert_eq!(count(&widened, "Cast"), 3);
        assert_eq!(count(&widened, "Identity"), count(&m, "Identity") + 2);
        let rounded = model(|k| f16::from_f32(w(k)).to_f32());
        for (a, b) in run(&rounded).iter().zip(&run(&widened)) {
            assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "{a} vs {b}");
        }
        // An f32 model has nothing to widen.
        assert_eq!(widened_f16(&m).unwrap(), m);
    }
}

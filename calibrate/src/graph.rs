//! A small ONNX-shaped graph: named values, nodes with ONNX operator names and attributes, and
//! constant tensors. The exporter builds the f32 step model in it, [`crate::int8::quantize`] rewrites its linear
//! layers to integer `MatMulInteger`, and the binary serialises it to ONNX protobuf.
//!
//! Values are strings (ONNX's namespace). Each [`Graph::linear`] records a [`LinearLayer`] so that
//! calibration can observe its input and quantization can find it again.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

/// Element types the step models use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ElemType {
    F32,
    U8,
    I8,
    I32,
    I64,
}

impl ElemType {
    /// The `TensorProto.DataType` code.
    pub const fn onnx_code(self) -> i32 {
        match self {
            ElemType::F32 => 1,
            ElemType::U8 => 2,
            ElemType::I8 => 3,
            ElemType::I32 => 6,
            ElemType::I64 => 7,
        }
    }

    /// The element type of a `TensorProto.DataType` code, if it is one of these.
    pub fn from_onnx_code(code: i32) -> Option<Self> {
        [Self::F32, Self::U8, Self::I8, Self::I32, Self::I64]
            .into_iter()
            .find(|t| t.onnx_code() == code)
    }
}

/// Constant tensor data.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    U8(Vec<u8>),
    I8(Vec<i8>),
    I32(Vec<i32>),
    I64(Vec<i64>),
}

impl Data {
    pub fn len(&self) -> usize {
        match self {
            Data::F32(v) => v.len(),
            Data::U8(v) => v.len(),
            Data::I8(v) => v.len(),
            Data::I32(v) => v.len(),
            Data::I64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn elem(&self) -> ElemType {
        match self {
            Data::F32(_) => ElemType::F32,
            Data::U8(_) => ElemType::U8,
            Data::I8(_) => ElemType::I8,
            Data::I32(_) => ElemType::I32,
            Data::I64(_) => ElemType::I64,
        }
    }

    /// Bytes as stored in ONNX `raw_data` (little endian).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            Data::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::U8(v) => v.clone(),
            Data::I8(v) => v.iter().map(|&x| x as u8).collect(),
            Data::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

/// A named constant (an ONNX initializer).
#[derive(Debug, Clone, PartialEq)]
pub struct Constant {
    pub name: String,
    pub dims: Vec<usize>,
    pub data: Data,
}

/// A node attribute.
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
}

/// One operator application.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// ONNX operator type (`MatMul`, `LayerNormalization`, ...).
    pub op: String,
    pub name: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attrs: Vec<(String, Attr)>,
}

/// A graph input or output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Io {
    pub name: String,
    pub elem: ElemType,
    /// Fixed dimensions; `None` leaves the shape to the runtime (calibration taps).
    pub dims: Option<Vec<usize>>,
}

/// A linear layer `y = x W (+ c) (+ b)` as built by [`Graph::linear`]: the MatMul reading `input`
/// with the constant `weight` `[in, out]` writes `matmul_out`; an optional per-output-channel
/// factor and the bias follow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinearLayer {
    pub name: String,
    pub input: String,
    pub weight: String,
    pub matmul_out: String,
    pub in_dim: usize,
    pub out_dim: usize,
    /// Whether int8 export may quantize it.
    pub quantizable: bool,
    /// Whether its input is a LayerNorm's output whose affine may absorb per-channel
    /// equalization factors (see [`crate::equalize`]).
    pub after_norm: bool,
}

/// The graph under construction (and afterwards).
#[derive(Debug, Clone, Default)]
pub struct Graph {
    pub name: String,
    pub inputs: Vec<Io>,
    pub outputs: Vec<Io>,
    pub nodes: Vec<Node>,
    pub constants: Vec<Constant>,
    pub linears: Vec<LinearLayer>,
    scope: String,
    counter: usize,
    shared: HashMap<String, String>,
}

/// Options of one [`Graph::linear`].
#[derive(Debug, Clone, Default)]
pub struct LinearOpts<'a> {
    pub bias: Option<&'a [f32]>,
    pub quantizable: bool,
}

impl Graph {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            ..Self::default()
        }
    }

    /// Prefix for the names generated from now on (e.g. `block3`).
    pub fn set_scope(&mut self, scope: &str) {
        self.scope = scope.to_string();
    }

    /// `name` within the current scope (`block3/qkv`).
    pub fn scoped(&self, name: &str) -> String {
        if self.scope.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.scope)
        }
    }

    fn fresh(&mut self, op: &str) -> String {
        self.counter += 1;
        self.scoped(&format!("{op}_{}", self.counter))
    }

    /// Declare a graph input.
    pub fn input(&mut self, name: &str, elem: ElemType, dims: &[usize]) -> String {
        self.inputs.push(Io {
            name: name.to_string(),
            elem,
            dims: Some(dims.to_vec()),
        });
        name.to_string()
    }

    /// Expose `value` as the graph output `name` (through an `Identity` when the names differ).
    pub fn output(&mut self, value: &str, name: &str, elem: ElemType, dims: Option<&[usize]>) {
        if value != name {
            self.nodes.push(Node {
                op: "Identity".into(),
                name: format!("{name}/identity"),
                inputs: vec![value.to_string()],
                outputs: vec![name.to_string()],
                attrs: Vec::new(),
            });
        }
        self.outputs.push(Io {
            name: name.to_string(),
            elem,
            dims: dims.map(<[usize]>::to_vec),
        });
    }

    /// Add a constant named `name` within the current scope.
    pub fn constant(&mut self, name: &str, dims: &[usize], data: Data) -> String {
        assert_eq!(
            dims.iter().product::<usize>(),
            data.len(),
            "constant {name}: dims and data disagree"
        );
        let name = self.scoped(name);
        self.constants.push(Constant {
            name: name.clone(),
            dims: dims.to_vec(),
            data,
        });
        name
    }

    /// An `i64` constant shared by the whole graph (axes, shapes, slice bounds).
    pub fn ints(&mut self, values: &[i64]) -> String {
        let key = format!("{values:?}");
        if let Some(name) = self.shared.get(&key) {
            return name.clone();
        }
        let name = format!("const_i64_{}", self.shared.len());
        self.constants.push(Constant {
            name: name.clone(),
            dims: vec![values.len()],
            data: Data::I64(values.to_vec()),
        });
        self.shared.insert(key, name.clone());
        name
    }

    /// A scalar f32 constant shared by the whole graph.
    pub fn scalar(&mut self, value: f32) -> String {
        let key = format!("f32:{:08x}", value.to_bits());
        if let Some(name) = self.shared.get(&key) {
            return name.clone();
        }
        let name = format!("const_f32_{}", self.shared.len());
        self.constants.push(Constant {
            name: name.clone(),
            dims: Vec::new(),
            data: Data::F32(vec![value]),
        });
        self.shared.insert(key, name.clone());
        name
    }

    /// Apply `op` to `inputs`; returns its one (generated) output.
    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
        let out = self.fresh(op);
        self.push(op, inputs, &[out.as_str()], attrs);
        out
    }

    /// Apply `op` writing the given output names.
    pub fn push(&mut self, op: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<(&str, Attr)>) {
        let name = format!("{}/node", outputs.first().copied().unwrap_or("anon"));
        self.nodes.push(Node {
            op: op.to_string(),
            name,
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            attrs: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        });
    }

    pub fn add(&mut self, a: &str, b: &str) -> String {
        self.op("Add", &[a, b], Vec::new())
    }

    pub fn sub(&mut self, a: &str, b: &str) -> String {
        self.op("Sub", &[a, b], Vec::new())
    }

    pub fn mul(&mut self, a: &str, b: &str) -> String {
        self.op("Mul", &[a, b], Vec::new())
    }

    pub fn matmul(&mut self, a: &str, b: &str) -> String {
        self.op("MatMul", &[a, b], Vec::new())
    }

    pub fn sigmoid(&mut self, x: &str) -> String {
        self.op("Sigmoid", &[x], Vec::new())
    }

    pub fn tanh(&mut self, x: &str) -> String {
        self.op("Tanh", &[x], Vec::new())
    }

    pub fn relu(&mut self, x: &str) -> String {
        self.op("Relu", &[x], Vec::new())
    }

    /// `x · σ(1.702 x)` (CLIP's QuickGELU).
    pub fn quick_gelu(&mut self, x: &str) -> String {
        let k = self.scalar(1.702);
        let kx = self.mul(x, &k);
        let s = self.sigmoid(&kx);
        self.mul(x, &s)
    }

    /// The exact erf GELU `x/2 · (1 + erf(x/√2))`.
    pub fn gelu_erf(&mut self, x: &str) -> String {
        let inv_sqrt2 = self.scalar(std::f32::consts::FRAC_1_SQRT_2);
        let half = self.scalar(0.5);
        let one = self.scalar(1.0);
        let t = self.mul(x, &inv_sqrt2);
        let e = self.op("Erf", &[&t], Vec::new());
        let e1 = self.add(&e, &one);
        let hx = self.mul(x, &half);
        self.mul(&hx, &e1)
    }

    /// `Softmax` over the last axis.
    pub fn softmax(&mut self, x: &str) -> String {
        self.op("Softmax", &[x], vec![("axis", Attr::Int(-1))])
    }

    pub fn reshape(&mut self, x: &str, shape: &[i64]) -> String {
        let s = self.ints(shape);
        self.op("Reshape", &[x, &s], Vec::new())
    }

    pub fn transpose(&mut self, x: &str, perm: &[i64]) -> String {
        self.op("Transpose", &[x], vec![("perm", Attr::Ints(perm.to_vec()))])
    }

    pub fn concat(&mut self, xs: &[&str], axis: i64) -> String {
        self.op("Concat", xs, vec![("axis", Attr::Int(axis))])
    }

    pub fn cast(&mut self, x: &str, to: ElemType) -> String {
        self.op(
            "Cast",
            &[x],
            vec![("to", Attr::Int(i64::from(to.onnx_code())))],
        )
    }

    /// `x[.., start..end]` along `axis`.
    pub fn slice(&mut self, x: &str, axis: i64, start: usize, end: usize) -> String {
        let s = self.ints(&[start as i64]);
        let e = self.ints(&[end as i64]);
        let a = self.ints(&[axis]);
        self.op("Slice", &[x, &s, &e, &a], Vec::new())
    }

    /// `LayerNormalization` over the last axis with the given affine.
    pub fn layer_norm(
        &mut self,
        x: &str,
        name: &str,
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
    ) -> String {
        let d = gamma.len();
        let g = self.constant(&format!("{name}.weight"), &[d], Data::F32(gamma.to_vec()));
        let b = self.constant(&format!("{name}.bias"), &[d], Data::F32(beta.to_vec()));
        self.op(
            "LayerNormalization",
            &[x, &g, &b],
            vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(eps))],
        )
    }

    /// A linear layer `x W^T (· c) + b` for `w` row-major `[out, in]` (PyTorch's layout), stored
    /// transposed (`[in, out]`) for `MatMul`. Recorded in [`Graph::linears`] under `name` (scoped).
    pub fn linear(
        &mut self,
        x: &str,
        name: &str,
        w: &[f32],
        out_dim: usize,
        in_dim: usize,
        opts: LinearOpts<'_>,
    ) -> String {
        assert_eq!(w.len(), out_dim * in_dim, "linear {name}: weight size");
        let mut wt = vec![0f32; w.len()];
        for o in 0..out_dim {
            for i in 0..in_dim {
                wt[i * out_dim + o] = w[o * in_dim + i];
            }
        }
        let weight = self.constant(&format!("{name}.weight"), &[in_dim, out_dim], Data::F32(wt));
        let full = self.scoped(name);
        let y = format!("{full}.matmul");
        self.push("MatMul", &[x, &weight], &[&y], Vec::new());
        self.linears.push(LinearLayer {
            name: full,
            input: x.to_string(),
            weight,
            matmul_out: y.clone(),
            in_dim,
            out_dim,
            quantizable: opts.quantizable,
            after_norm: false,
        });
        let mut y = y;
        if let Some(b) = opts.bias {
            assert_eq!(b.len(), out_dim, "linear {name}: bias size");
            let b = self.constant(&format!("{name}.bias"), &[out_dim], Data::F32(b.to_vec()));
            y = self.add(&y, &b);
        }
        y
    }

    /// The constant called `name`.
    pub fn constant_named(&self, name: &str) -> Option<&Constant> {
        self.constants.iter().find(|c| c.name == name)
    }

    /// Parameter count and bytes of the constants, by element type.
    pub fn constant_bytes(&self) -> usize {
        self.constants
            .iter()
            .map(|c| {
                c.data.len()
                    * match c.data.elem() {
                        ElemType::F32 | ElemType::I32 => 4,
                        ElemType::I64 => 8,
                        ElemType::U8 | ElemType::I8 => 1,
                    }
            })
            .sum()
    }

    /// How many nodes of operator `op` there are.
    pub fn count_op(&self, op: &str) -> usize {
        self.nodes.iter().filter(|n| n.op == op).count()
    }

    /// A copy that also outputs `taps` (values of this graph) as f32 outputs of unknown shape.
    pub fn with_taps(&self, taps: &[String]) -> Graph {
        let mut g = self.clone();
        let existing: HashSet<String> = g.outputs.iter().map(|o| o.name.clone()).collect();
        for t in taps {
            if !existing.contains(t) {
                g.outputs.push(Io {
                    name: t.clone(),
                    elem: ElemType::F32,
                    dims: None,
                });
            }
        }
        g
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_stores_the_transposed_weight_and_adds_the_bias() {
        let mut g = Graph::new("t");
        let x = g.input("x", ElemType::F32, &[1, 3]);
        let w = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // [2, 3]
        let y = g.linear(
            &x,
            "fc",
            &w,
            2,
            3,
            LinearOpts {
                bias: Some(&[0.5, -0.5]),
                quantizable: true,
            },
        );
        let c = g.constant_named("fc.weight").unwrap();
        assert_eq!(c.dims, vec![3, 2]);
        assert_eq!(c.data, Data::F32(vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]));
        assert_eq!(g.linears.len(), 1);
        assert_eq!(g.linears[0].input, "x");
        assert_eq!(g.count_op("Add"), 1);
        assert_ne!(y, g.linears[0].matmul_out);
    }
}

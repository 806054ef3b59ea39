//! What a step costs: multiply-accumulates per operator class, counted on the model as written
//! (tract's decluttered graph, before any per-CPU rewrite), and the matrix kernels tract picked
//! for this CPU in the optimised plan. `pe-clip info --package P --cost` prints both; the cost
//! model of docs/device.md multiplies the first by published throughputs.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::matmul::optimized::{OptMatMul, ProtoFusedSpec};

use super::StepModel;
use crate::error::{Error, Result};

/// One operator class of a step: a matrix product in one element type, or every other op.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OpClass {
    /// `matmul f32`, `matmul i8`, `matmul f16`, or `other` (element-wise, norms, softmax, ...).
    pub class: String,
    pub nodes: usize,
    /// Multiply-accumulates per step (for `other`: output elements, a rough count of work).
    pub macs: u64,
}

/// One matrix kernel of the optimised plan and what it does per step.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct KernelUse {
    /// tract-linalg's kernel name, e.g. `avx2_mmm_f32_8x8`, `arm64simd_mmm_i32_8x8_dot`.
    pub kernel: String,
    /// The operand packings it runs with (`A•B`), which tell an i8 path from an i32 one.
    pub packing: String,
    pub nodes: usize,
    pub macs: u64,
}

/// The cost of one step of a model on this CPU.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StepCost {
    /// The instruction-set features tract detected (after `TRACT_CPU_ISA`).
    pub isa: String,
    /// Operator classes of the model as written, largest first.
    pub classes: Vec<OpClass>,
    /// Matrix kernels of the plan this CPU runs, largest first.
    pub kernels: Vec<KernelUse>,
    /// The other operators of that plan (what remains after tract and pe-clip fused what they
    /// fuse into the matrix products), by operator name with their output elements, largest
    /// first.
    pub plan_other: Vec<OpClass>,
}

impl StepCost {
    /// Multiply-accumulates of every matrix product per step.
    pub fn matmul_macs(&self) -> u64 {
        self.classes
            .iter()
            .filter(|c| c.class.starts_with("matmul"))
            .map(|c| c.macs)
            .sum()
    }
}

fn volume(shape: &ShapeFact) -> Option<u64> {
    shape
        .as_concrete()
        .map(|s| s.iter().map(|&d| d as u64).product())
}

/// Each matrix product's multiply-accumulates: the product of every axis size of its einsum
/// (`m·k·n` times the batch axes).
fn einsum_macs(op: &EinSum, inputs: &[&TypedFact], output: &TypedFact) -> Option<u64> {
    let mut macs = 1u64;
    for axis in op.axes.iter_all_axes() {
        let in_input = axis.inputs.iter().enumerate().find_map(|(slot, pos)| {
            let p = *pos.first()?;
            inputs.get(slot)?.shape.as_concrete()?.get(p).copied()
        });
        // An axis only the output has (a broadcast) is in no input.
        let size = in_input.or_else(|| {
            let p = *axis.outputs.first()?.first()?;
            output.shape.as_concrete()?.get(p).copied()
        })?;
        macs = macs.checked_mul(size as u64)?;
    }
    Some(macs)
}

fn add(classes: &mut Vec<OpClass>, class: String, macs: u64) {
    match classes.iter_mut().find(|c| c.class == class) {
        Some(c) => {
            c.nodes += 1;
            c.macs += macs;
        }
        None => classes.push(OpClass {
            class,
            nodes: 1,
            macs,
        }),
    }
}

/// Operator classes of ONNX `bytes` as written (`context` names them in errors).
fn op_classes(bytes: &[u8], context: &str) -> Result<Vec<OpClass>> {
    let err = |e: TractError| Error::engine(context, e);
    let model = super::onnx_reader()
        .model_for_read(&mut &bytes[..])
        .map_err(err)?
        .into_typed()
        .map_err(err)?
        .into_decluttered()
        .map_err(err)?;
    let mut classes = Vec::new();
    for node in model.eval_order().map_err(err)? {
        let node = model.node(node);
        let inputs = model.node_input_facts(node.id).map_err(err)?;
        if let Some(op) = node.op_as::<EinSum>() {
            let dt = inputs.first().map(|f| f.datum_type.unquantized());
            let class = match dt {
                Some(DatumType::I8) | Some(DatumType::U8) => "matmul i8".to_string(),
                Some(dt) => format!("matmul {dt:?}").to_lowercase(),
                None => "matmul".to_string(),
            };
            let macs = einsum_macs(op, &inputs, &node.outputs[0].fact).ok_or_else(|| {
                Error::engine(
                    context,
                    format!("{}: a matrix product of no fixed shape", node.name),
                )
            })?;
            add(&mut classes, class, macs);
        } else if !node.inputs.is_empty() {
            let elements: u64 = node
                .outputs
                .iter()
                .filter_map(|o| volume(&o.fact.shape))
                .sum();
            add(&mut classes, "other".into(), elements);
        }
    }
    classes.sort_by_key(|c| std::cmp::Reverse(c.macs));
    Ok(classes)
}

/// The matrix kernels of an optimised plan.
fn kernels(model: &TypedModel) -> Vec<KernelUse> {
    let mut uses: Vec<KernelUse> = Vec::new();
    let mut count = |kernel: String, packing: String, macs: u64| match uses
        .iter_mut()
        .find(|u| u.kernel == kernel && u.packing == packing)
    {
        Some(u) => {
            u.nodes += 1;
            u.macs += macs;
        }
        None => uses.push(KernelUse {
            kernel,
            packing,
            nodes: 1,
            macs,
        }),
    };
    for node in &model.nodes {
        if let Some(op) = node.op_as::<super::linear_i8::Int8Linear>() {
            let (k, n) = op.dims();
            let rows = node
                .inputs
                .first()
                .and_then(|&i| volume(&model.outlet_fact(i).ok()?.shape))
                .unwrap_or(0)
                / k as u64;
            count(
                op.kernel().name().to_string(),
                op.kernel().packing().to_string(),
                rows * (k * n) as u64,
            );
            continue;
        }
        let Some(op) = node.op_as::<OptMatMul>() else {
            continue;
        };
        let k = op
            .guess_k()
            .and_then(|k| k.to_i64().ok())
            .unwrap_or(1)
            .max(1) as u64;
        let macs = volume(&op.c_fact.shape).unwrap_or(0) * k;
        // The mode tract picks at run time for this product's n (`ModePicker`: a vector kernel
        // for n = 1, else the matrix one); a step's shapes are fixed, so one mode runs.
        let n = op
            .c_n_axis
            .and_then(|ax| op.c_fact.shape.as_concrete()?.get(ax).copied())
            .unwrap_or(1);
        let Ok(mode) = op.mode_picker.pick(n) else {
            continue;
        };
        if let Some(mmm) = op.mmm.get(mode) {
            let packing = op
                .micro_ops
                .iter()
                .find_map(|o| match o {
                    ProtoFusedSpec::AddMatMul { packings, .. } => {
                        let (a, b) = &mmm.packings().get(packings.get(mode)?.0)?;
                        Some(format!("{a:?}•{b:?}"))
                    }
                    _ => None,
                })
                .unwrap_or_default();
            count(mmm.name().to_string(), packing, macs);
        }
    }
    uses.sort_by_key(|u| std::cmp::Reverse(u.macs));
    uses
}

/// The operators of an optimised plan that are neither matrix products nor constants, by name,
/// with their output elements per step.
fn plan_other(model: &TypedModel) -> Vec<OpClass> {
    let mut other = Vec::new();
    for node in &model.nodes {
        let op = node.op();
        if node.inputs.is_empty()
            || op.downcast_ref::<OptMatMul>().is_some()
            || op.downcast_ref::<super::linear_i8::Int8Linear>().is_some()
        {
            continue;
        }
        let elements = node
            .outputs
            .iter()
            .filter_map(|o| volume(&o.fact.shape))
            .sum();
        add(&mut other, op.name().to_string(), elements);
    }
    other.sort_by_key(|c| std::cmp::Reverse(c.macs));
    other
}

/// The instruction-set features tract uses on this CPU, as tract names them.
pub fn tract_isa() -> String {
    format!("{:?}", tract_onnx::tract_core::tract_linalg::isa::native())
}

impl StepModel {
    /// The cost of one step of the model in `bytes` (as [`StepModel::from_onnx`] takes it) on
    /// this CPU: classes counted on the model as written, kernels from this loaded plan.
    pub fn cost(&self, bytes: &[u8], context: &str) -> Result<StepCost> {
        Ok(StepCost {
            isa: tract_isa(),
            classes: op_classes(bytes, context)?,
            kernels: kernels(self.plan.model()),
            plan_other: plan_other(self.plan.model()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pe_clip_calibrate::graph::{ElemType, Graph, LinearOpts};
    use pe_clip_calibrate::int8::{quantize, LinearRanges};
    use prost::Message;

    /// `[rows, 3] x [3, 2]`, then `[rows, 2] x [2, 5]`: 16 · rows multiply-accumulates.
    fn two_linears(int8: bool, rows: usize) -> Vec<u8> {
        let mut g = Graph::new("c");
        let x = g.input("x", ElemType::F32, &[rows, 3]);
        let opts = LinearOpts {
            bias: None,
            quantizable: true,
        };
        let a = g.linear(&x, "a", &[0.5; 6], 2, 3, opts.clone());
        let b = g.linear(&a, "b", &[-0.25; 10], 5, 2, opts);
        g.output(&b, "y", ElemType::F32, Some(&[rows, 5]));
        let g = if int8 {
            let ranges = [("a", 1.0), ("b", 2.0)]
                .map(|(n, r)| (n.to_string(), LinearRanges { input: r }))
                .into();
            quantize(&g, &ranges, false).0
        } else {
            g
        };
        crate::onnx::to_model_proto(&g, &[]).encode_to_vec()
    }

    #[test]
    fn matrix_products_are_counted_per_class_and_per_kernel() {
        // One row: a vector-or-matrix product, whose plan holds two kernels of which one runs.
        let cases = [(false, "matmul f32"), (true, "matmul i8")];
        for ((int8, class), rows) in cases.into_iter().flat_map(|c| [(c, 4), (c, 1)]) {
            let bytes = two_linears(int8, rows);
            let macs = 16 * rows as u64;
            let classes = op_classes(&bytes, "t").unwrap();
            let mm: Vec<&OpClass> = classes.iter().filter(|c| c.class != "other").collect();
            assert_eq!(mm.len(), 1, "{classes:?}");
            assert_eq!(
                (mm[0].class.as_str(), mm[0].nodes, mm[0].macs),
                (class, 2, macs)
            );
            let plan = super::super::onnx_reader()
                .model_for_read(&mut &bytes[..])
                .unwrap()
                .into_optimized()
                .unwrap();
            let k = kernels(&plan);
            assert_eq!(k.iter().map(|k| k.macs).sum::<u64>(), macs, "{k:?}");
            assert_eq!(k.iter().map(|k| k.nodes).sum::<usize>(), 2, "{k:?}");
            assert!(k
                .iter()
                .all(|k| !k.kernel.is_empty() && !k.packing.is_empty()));
        }
    }
}

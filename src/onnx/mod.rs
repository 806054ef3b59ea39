//! Serialise a [`Graph`] to ONNX protobuf with tract's generated types (opset 17, IR version 8).
//! Constants go in `raw_data` (little endian), as `onnx.checker` and both runtimes expect. The
//! int8 layers of a written model are read back and rewritten in [`sites`].

use pe_clip_calibrate::graph::{Attr, Graph, Io};
use prost::Message;
pub use tract_onnx::pb;

mod half;
mod sites;

pub use half::{f16_linears, widened_f16};

pub use sites::{
    dequantized, fused_int8_linears, quant_sites, set_site_scales, widened_int8_matmuls, QuantSite,
    Widening, FUSED_DOMAIN, FUSED_OP_TYPE,
};

/// The operator set the step models use (`LayerNormalization` needs 17).
pub const OPSET: i64 = 17;
/// IR version matching opset 17.
pub const IR_VERSION: i64 = 8;

/// `Cast(input) -> output` to ONNX element type `to`, named `{output}/cast` (the engine finds an
/// f16 package's activation casts by the `.f16/cast` these names end in).
pub(crate) fn cast_node(input: &str, output: &str, to: i32) -> pb::NodeProto {
    pb::NodeProto {
        input: vec![input.to_string()],
        output: vec![output.to_string()],
        name: format!("{output}/cast"),
        op_type: "Cast".into(),
        attribute: vec![pb::AttributeProto {
            name: "to".into(),
            r#type: pb::attribute_proto::AttributeType::Int as i32,
            i: i64::from(to),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn value_info(io: &Io) -> pb::ValueInfoProto {
    typed_value_info(&io.name, io.elem.onnx_code(), io.dims.as_deref())
}

/// A graph input or output `name` of ONNX element type `elem`, of fixed `dims` if given.
pub(crate) fn typed_value_info(
    name: &str,
    elem: i32,
    dims: Option<&[usize]>,
) -> pb::ValueInfoProto {
    let shape = dims.map(|dims| pb::TensorShapeProto {
        dim: dims
            .iter()
            .map(|&d| pb::tensor_shape_proto::Dimension {
                denotation: String::new(),
                value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(d as i64)),
            })
            .collect(),
    });
    pb::ValueInfoProto {
        name: name.to_string(),
        r#type: Some(pb::TypeProto {
            denotation: String::new(),
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: elem,
                shape,
            })),
        }),
        doc_string: String::new(),
    }
}

fn attribute(name: &str, a: &Attr) -> pb::AttributeProto {
    use pb::attribute_proto::AttributeType;
    let mut p = pb::AttributeProto {
        name: name.to_string(),
        ..Default::default()
    };
    match a {
        Attr::Int(i) => {
            p.r#type = AttributeType::Int as i32;
            p.i = *i;
        }
        Attr::Ints(v) => {
            p.r#type = AttributeType::Ints as i32;
            p.ints = v.clone();
        }
        Attr::Float(f) => {
            p.r#type = AttributeType::Float as i32;
            p.f = *f;
        }
    }
    p
}

/// The graph as an ONNX `ModelProto`; `metadata` lands in `metadata_props`.
pub fn to_model_proto(g: &Graph, metadata: &[(&str, String)]) -> pb::ModelProto {
    let graph = pb::GraphProto {
        name: g.name.clone(),
        node: g
            .nodes
            .iter()
            .map(|n| pb::NodeProto {
                input: n.inputs.clone(),
                output: n.outputs.clone(),
                name: n.name.clone(),
                op_type: n.op.clone(),
                attribute: n.attrs.iter().map(|(k, a)| attribute(k, a)).collect(),
                ..Default::default()
            })
            .collect(),
        initializer: g
            .constants
            .iter()
            .map(|c| pb::TensorProto {
                dims: c.dims.iter().map(|&d| d as i64).collect(),
                data_type: c.data.elem().onnx_code(),
                name: c.name.clone(),
                raw_data: c.data.to_le_bytes(),
                ..Default::default()
            })
            .collect(),
        input: g.inputs.iter().map(value_info).collect(),
        output: g.outputs.iter().map(value_info).collect(),
        ..Default::default()
    };
    pb::ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        producer_name: "pe-clip".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        metadata_props: metadata
            .iter()
            .map(|(k, v)| pb::StringStringEntryProto {
                key: (*k).to_string(),
                value: v.clone(),
            })
            .collect(),
        ..Default::default()
    }
}

/// The graph as ONNX bytes.
pub fn to_bytes(g: &Graph, metadata: &[(&str, String)]) -> Vec<u8> {
    to_model_proto(g, metadata).encode_to_vec()
}

/// Parse ONNX bytes (`context` names them in errors).
pub fn decode(bytes: &[u8], context: &str) -> crate::error::Result<pb::ModelProto> {
    pb::ModelProto::decode(bytes)
        .map_err(|e| crate::error::Error::engine(context, format!("not an ONNX model: {e}")))
}

/// Add `names` (values computed inside the graph) as extra f32 outputs.
pub fn add_outputs(m: &mut pb::ModelProto, names: &[String]) {
    let Some(g) = m.graph.as_mut() else {
        return;
    };
    for n in names {
        if !g.output.iter().any(|o| &o.name == n) {
            g.output.push(value_info(&Io {
                name: n.clone(),
                elem: pe_clip_calibrate::graph::ElemType::F32,
                dims: None,
            }));
        }
    }
}

/// Test helper: `m`'s first output, run once in tract (optimised plan) on one f32 input.
#[cfg(test)]
pub(crate) fn run_once(m: &pb::ModelProto, shape: &[usize], x: &[f32]) -> Vec<f32> {
    run_once_with(&tract_onnx::onnx(), m, shape, x)
}

/// [`run_once`] through `reader` (one with more operators registered).
#[cfg(test)]
pub(crate) fn run_once_with(
    reader: &tract_onnx::Onnx,
    m: &pb::ModelProto,
    shape: &[usize],
    x: &[f32],
) -> Vec<f32> {
    use tract_onnx::prelude::{tvec, Framework, InferenceModelExt, IntoRunnable, Tensor};
    let bytes = m.encode_to_vec();
    let plan = reader
        .model_for_read(&mut &bytes[..])
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let y = plan
        .run(tvec!(Tensor::from_shape(shape, x).unwrap().into()))
        .unwrap();
    y[0].try_as_plain_ram()
        .unwrap()
        .as_slice::<f32>()
        .unwrap()
        .to_vec()
}

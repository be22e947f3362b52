//! ONNX graphs on tract, with the patch SCRFD's exports need.

use std::path::Path;

use tract_onnx::pb;
use tract_onnx::prelude::*;

use crate::{Error, Result};

pub type Plan = TypedRunnableModel<TypedModel>;

pub(super) fn tract_err(path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::weights(path, format!("{what}: {e:#}"))
}

/// Loads an ONNX file for a fixed NCHW input. Resize nodes that give only output `sizes`
/// (empty `scales`, as in SCRFD's FPN) are rewritten to constant `scales`: tract's Resize
/// evaluates an empty `scales` as "no resize" and the graph then breaks at the next Add.
pub fn load_onnx(path: &Path, input_shape: [usize; 4]) -> Result<Plan> {
    let proto = tract_onnx::onnx()
        .proto_model_for_path(path)
        .map_err(|e| tract_err(path, "cannot read ONNX", e))?;
    plan_for_input(path, proto, input_shape)
}

/// Prepares an ONNX graph for a fixed NCHW input. tract 0.21 runs an opset-11 `Resize` whose
/// `scales` input is empty (the exporters' way to say "use `sizes`") as no resize at all, so
/// every such node gets constant scales: output over input shape, both from tract's shape
/// analysis at this input size. Unlike a lookup of constant `sizes`, this also covers
/// dynamic-shape exports (InsightFace's det_500m) whose sizes come from `Shape` of another map.
pub fn plan_for_input(path: &Path, mut proto: pb::ModelProto, shape: [usize; 4]) -> Result<Plan> {
    let err =
        |what: &str, e: &dyn std::fmt::Display| Error::weights(path, format!("{what}: {e:#}"));
    let onnx = tract_onnx::onnx();
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| Error::weights(path, "ONNX file has no graph"))?;
    let empty_const = |name: &str| {
        name.is_empty()
            || graph
                .initializer
                .iter()
                .any(|t| t.name == name && t.dims.iter().product::<i64>() == 0)
            || graph.node.iter().any(|n| {
                n.op_type == "Constant"
                    && n.output.iter().any(|o| o == name)
                    && n.attribute.iter().any(|a| {
                        a.t.as_ref()
                            .is_some_and(|t| t.dims.iter().product::<i64>() == 0)
                    })
            })
    };
    let targets: Vec<usize> = graph
        .node
        .iter()
        .enumerate()
        .filter(|(_, n)| {
            n.op_type == "Resize"
                && n.input.len() == 4
                && !n.input[3].is_empty()
                && empty_const(&n.input[2])
        })
        .map(|(i, _)| i)
        .collect();
    if !targets.is_empty() {
        let mut model = onnx
            .model_for_proto_model(&proto)
            .and_then(|m| m.with_input_fact(0, f32::fact(shape).into()))
            .map_err(|e| err("cannot read ONNX graph", &e))?;
        model
            .analyse(false)
            .map_err(|e| err("cannot infer ONNX shapes", &e))?;
        let concrete = |name: &str| -> Option<Vec<usize>> {
            let o = model.find_outlet_label(name)?;
            model
                .outlet_fact(o)
                .ok()?
                .shape
                .as_concrete_finite()
                .ok()
                .flatten()
                .map(|s| s.to_vec())
        };
        let mut inits = Vec::new();
        let mut rewrites = Vec::new();
        for i in targets {
            let node = &graph.node[i];
            let (Some(inp), Some(out)) = (concrete(&node.input[0]), concrete(&node.output[0]))
            else {
                return Err(Error::weights(
                    path,
                    format!(
                        "Resize `{}`: shapes not known at input {shape:?}",
                        node.name
                    ),
                ));
            };
            if inp.len() != out.len() || inp.contains(&0) {
                return Err(Error::weights(
                    path,
                    format!("Resize `{}`: input {inp:?} vs output {out:?}", node.name),
                ));
            }
            let scales: Vec<f32> = out
                .iter()
                .zip(&inp)
                .map(|(&o, &i)| o as f32 / i as f32)
                .collect();
            let name = format!("{}__mcld_scales", node.output[0]);
            inits.push(pb::TensorProto {
                name: name.clone(),
                dims: vec![scales.len() as i64],
                data_type: pb::tensor_proto::DataType::Float as i32,
                float_data: scales,
                ..Default::default()
            });
            rewrites.push((i, name));
        }
        let graph = proto.graph.as_mut().expect("checked above");
        for (i, name) in rewrites {
            graph.node[i].input[2] = name;
            graph.node[i].input.truncate(3);
        }
        graph.initializer.extend(inits);
    }
    onnx.model_for_proto_model(&proto)
        .and_then(|m| m.with_input_fact(0, f32::fact(shape).into()))
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .map_err(|e| err("cannot prepare the ONNX graph", &e))
}

//! ModelProto -> IR graph.

use super::ops::{convert, ConvertError, Converted};
use super::proto::{type_proto, ModelProto, ValueInfoProto};
use super::tensor::{decode_tensor, dtype_of, ExternalFiles};
use super::{MAX_OPSET, MIN_OPSET};
use crate::error::{Error, Result, Unsupported};
use crate::ir::{verify::verify, Dim, Graph, Op, TensorType, Value, ValueRef};
use bytes::Bytes;
use prost::Message;
use std::collections::HashMap;
use std::path::Path;

/// Loads an ONNX file through a memory map: initializers and external data stay
/// in the maps (no copy), so models of any size import in constant extra memory.
pub fn load_model(path: &Path) -> Result<Graph> {
    let io = |source| Error::Io { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    // SAFETY: read-only map; the file must not be truncated while the graph lives.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
    let model = decode(Bytes::from_owner(map), &path.display().to_string())?;
    import_model(model, path.parent(), &path.display().to_string())
}

/// Imports a model held in memory; external data, if any, is looked up in `base`.
pub fn load_model_bytes(bytes: Bytes, base: Option<&Path>, what: &str) -> Result<Graph> {
    let model = decode(bytes, what)?;
    import_model(model, base, what)
}

fn decode(bytes: Bytes, what: &str) -> Result<ModelProto> {
    if bytes.is_empty() {
        return Err(Error::Malformed { path: what.into(), msg: "the file is empty".into() });
    }
    ModelProto::decode(bytes)
        .map_err(|e| Error::Malformed { path: what.into(), msg: format!("protobuf decoding failed: {e}") })
}

fn malformed(what: &str, msg: impl Into<String>) -> Error {
    Error::Malformed { path: what.into(), msg: msg.into() }
}

/// The default-domain opset a model imports.
pub fn default_opset(model: &ModelProto) -> Option<i64> {
    model
        .opset_import
        .iter()
        .find(|o| matches!(o.domain.as_deref(), None | Some("") | Some("ai.onnx")))
        .map(|o| o.version.unwrap_or(1))
}

/// Reads a value's declared tensor type; dims without value or name become fresh symbols.
fn declared_type(vi: &ValueInfoProto) -> std::result::Result<TensorType, String> {
    let name = vi.name.as_deref().unwrap_or("");
    let tt = match vi.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(type_proto::Value::TensorType(t)) => t,
        Some(_) => return Err("only tensor values are supported (not sequences, maps or optionals)".into()),
        None => return Err("has no type".into()),
    };
    let dtype = dtype_of(tt.elem_type.unwrap_or(0))?;
    let shape = tt.shape.as_ref().map(|s| {
        s.dim
            .iter()
            .enumerate()
            .map(|(i, d)| {
                use super::proto::tensor_shape_proto::dimension::Value as V;
                match &d.value {
                    Some(V::DimValue(v)) => Dim::fixed(*v),
                    Some(V::DimParam(p)) if !p.is_empty() => Dim::sym(p),
                    _ => Dim::sym(&format!("{name}_{i}")),
                }
            })
            .collect()
    });
    Ok(TensorType { dtype, shape })
}

pub fn import_model(model: ModelProto, base: Option<&Path>, what: &str) -> Result<Graph> {
    let gp = model.graph.as_ref().ok_or_else(|| malformed(what, "the model has no graph"))?;
    let gname = gp.name.clone().unwrap_or_else(|| "main".into());
    let Some(opset) = default_opset(&model) else {
        let domains: Vec<String> = model.opset_import.iter().map(|o| o.domain.clone().unwrap_or_default()).collect();
        return Err(Error::Unsupported(vec![Unsupported {
            node: gname,
            op: "(model)".into(),
            opset: 0,
            reason: format!(
                "imports only the op domains [{}], none of them the default ONNX domain",
                domains.join(", ")
            ),
        }]));
    };
    if !(MIN_OPSET..=MAX_OPSET).contains(&opset) {
        return Err(Error::Unsupported(vec![Unsupported {
            node: gname,
            op: "(model)".into(),
            opset,
            reason: format!("opset {opset} is outside the supported range {MIN_OPSET}..={MAX_OPSET}"),
        }]));
    }
    let mut g = Graph::new(&gname, opset);
    let mut names: HashMap<String, ValueRef> = HashMap::new();
    let mut unsupported = Vec::new();
    let mut ext = ExternalFiles::new(base);

    for t in &gp.initializer {
        let c = match decode_tensor(t, &mut ext) {
            Ok(c) => c,
            Err(e) if e.contains("is not supported") => {
                let name = t.name.clone().unwrap_or_default();
                unsupported.push(Unsupported { node: name, op: "(initializer)".into(), opset, reason: e });
                continue;
            }
            Err(e) => return Err(malformed(what, e)),
        };
        let name = c.name.clone();
        let ty = TensorType::fixed(c.dtype, &c.shape);
        let id = g.consts.insert(c).map_err(|e| malformed(what, e))?;
        let n = g.add_node(Op::Const { id }, name.clone(), &[], vec![Value { name: name.clone(), ty }]);
        names.insert(name, ValueRef { node: n, slot: 0 });
    }

    for vi in &gp.input {
        let name = vi.name.clone().unwrap_or_default();
        if names.contains_key(&name) {
            continue; // an initializer with a default: treated as the constant it is
        }
        let ty = match declared_type(vi) {
            Ok(t) => t,
            Err(e) => {
                unsupported.push(Unsupported { node: name, op: "(graph input)".into(), opset, reason: e });
                continue;
            }
        };
        let index = g.inputs.len();
        let n = g.add_node(Op::Input { index }, name.clone(), &[], vec![Value { name: name.clone(), ty }]);
        g.inputs.push(n);
        names.insert(name, ValueRef { node: n, slot: 0 });
    }

    // Convert every node first so that all unsupported ops are reported at once.
    let mut converted = Vec::with_capacity(gp.node.len());
    for (i, node) in gp.node.iter().enumerate() {
        let op_type = node.op_type.clone().unwrap_or_default();
        let node_name = node
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .or_else(|| node.output.first().cloned())
            .unwrap_or_else(|| format!("{op_type}_{i}"));
        let domain = node.domain.as_deref().unwrap_or("");
        if domain == "com.microsoft" && op_type == "MatMulNBits" {
            match super::ops::matmul_nbits(node) {
                Ok(c) => converted.push((node, node_name, c)),
                Err(ConvertError::Unsupported(reason)) => {
                    unsupported.push(Unsupported { node: node_name, op: format!("{domain}.{op_type}"), opset, reason })
                }
                Err(ConvertError::Invalid(msg)) => {
                    return Err(Error::Node { node: node_name, op: op_type, opset, msg })
                }
            }
            continue;
        }
        if !matches!(domain, "" | "ai.onnx") {
            unsupported.push(Unsupported {
                node: node_name,
                op: format!("{domain}.{op_type}"),
                opset,
                reason: format!("ops of domain '{domain}' are not supported"),
            });
            continue;
        }
        match convert(node, opset) {
            Ok(c) => converted.push((node, node_name, c)),
            Err(ConvertError::Unsupported(reason)) => {
                unsupported.push(Unsupported { node: node_name, op: op_type, opset, reason })
            }
            Err(ConvertError::Invalid(msg)) => return Err(Error::Node { node: node_name, op: op_type, opset, msg }),
        }
    }
    if !unsupported.is_empty() {
        return Err(Error::Unsupported(unsupported));
    }

    let hints: HashMap<&str, &ValueInfoProto> =
        gp.value_info.iter().chain(gp.output.iter()).filter_map(|v| Some((v.name.as_deref()?, v))).collect();
    for (node, node_name, c) in converted {
        let op_type = node.op_type.clone().unwrap_or_default();
        let err = |msg: String| Error::Node { node: node_name.clone(), op: op_type.clone(), opset, msg };
        let op = match c {
            Converted::Constant(t) => {
                let out = node.output.first().ok_or_else(|| err("Constant has no output".into()))?;
                let v = g.add_const(out.clone(), &t);
                if names.insert(out.clone(), v).is_some() {
                    return Err(err(format!("value '{out}' is produced twice")));
                }
                continue;
            }
            Converted::Op(op) => op,
        };
        let mut inputs = Vec::with_capacity(node.input.len());
        for name in &node.input {
            if name.is_empty() {
                inputs.push(None);
            } else {
                let v = names.get(name).ok_or_else(|| {
                    err(format!("input '{name}' is not produced by an earlier node, a graph input or an initializer"))
                })?;
                inputs.push(Some(*v));
            }
        }
        // Trailing empty optional inputs carry nothing.
        while inputs.last() == Some(&None) {
            inputs.pop();
        }
        let (min, max) = op.arity();
        if inputs.len() < min || inputs.len() > max || inputs.iter().take(min).any(|i| i.is_none()) {
            let range = if max == usize::MAX { format!("at least {min}") } else { format!("{min}..={max}") };
            return Err(err(format!("takes {range} inputs, got {}", node.input.len())));
        }
        if node.output.is_empty() {
            return Err(err("the node has no outputs".into()));
        }
        let outputs: Vec<Value> = node
            .output
            .iter()
            .map(|o| Value {
                name: o.clone(),
                // A placeholder until shape inference; a declared value_info is its fallback.
                ty: hints
                    .get(o.as_str())
                    .and_then(|vi| declared_type(vi).ok())
                    .unwrap_or(TensorType { dtype: crate::ir::DType::F32, shape: None }),
            })
            .collect();
        let n = g.add_node(op, node_name.clone(), &inputs, outputs);
        for (slot, o) in node.output.iter().enumerate() {
            if o.is_empty() {
                continue;
            }
            if names.insert(o.clone(), ValueRef { node: n, slot }).is_some() {
                return Err(err(format!("value '{o}' is produced twice")));
            }
        }
    }

    for vi in &gp.output {
        let name = vi.name.clone().unwrap_or_default();
        let v = *names
            .get(&name)
            .ok_or_else(|| malformed(what, format!("graph output '{name}' is not produced by any node")))?;
        g.outputs.push(crate::ir::GraphOutput { name, value: v });
    }
    verify(&g).map_err(|e| malformed(what, e))?;
    crate::passes::shape_infer::infer_shapes(&mut g)?;
    Ok(g)
}

//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod native;
pub mod qemu;

use edgec::ir::{Data, Tensor};
use std::path::PathBuf;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Compares two tensors: same dtype and shape; integers and bools exactly;
/// floats with |got - want| <= atol + rtol * |want|, NaN only where NaN is expected.
pub fn compare(got: &Tensor, want: &Tensor, rtol: f64, atol: f64) -> Result<(), String> {
    if got.dtype() != want.dtype() {
        return Err(format!("dtype {} != expected {}", got.dtype(), want.dtype()));
    }
    if got.shape != want.shape {
        return Err(format!("shape {:?} != expected {:?}", got.shape, want.shape));
    }
    let float = matches!(want.data, Data::F32(_) | Data::F64(_));
    let (g, w) = (got.to_f64_vec(), want.to_f64_vec());
    let mut worst: Option<(usize, f64)> = None;
    for i in 0..w.len() {
        let (a, b) = (g[i], w[i]);
        let ok = if !float {
            a == b
        } else if b.is_nan() || a.is_nan() {
            a.is_nan() && b.is_nan()
        } else if b.is_infinite() || a.is_infinite() {
            a == b
        } else {
            (a - b).abs() <= atol + rtol * b.abs()
        };
        if !ok {
            let excess = (a - b).abs();
            if worst.is_none_or(|(_, e)| excess > e || e.is_nan()) {
                worst = Some((i, excess));
            }
        }
    }
    match worst {
        None => Ok(()),
        Some((i, _)) => Err(format!("element {i}: got {} expected {} (rtol {rtol}, atol {atol})", g[i], w[i])),
    }
}

use edgec::onnx::proto::{
    tensor_shape_proto::{dimension::Value as DimValue, Dimension},
    type_proto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto,
};

/// A tensor-typed value_info; dims are numbers or symbolic names.
pub fn value_info(name: &str, elem_type: i32, dims: &[&str]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d.parse::<i64>() {
                Ok(v) => DimValue::DimValue(v),
                Err(_) => DimValue::DimParam(d.to_string()),
            }),
            denotation: None,
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem_type),
                shape: Some(TensorShapeProto { dim }),
            })),
            denotation: None,
        }),
        ..Default::default()
    }
}

pub fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(format!("{op}_{}", outputs.first().copied().unwrap_or(""))),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub fn f32_initializer(name: &str, dims: &[i64], values: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(1),
        float_data: values.to_vec(),
        ..Default::default()
    }
}

pub fn model(
    opset: i64,
    nodes: Vec<NodeProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    init: Vec<TensorProto>,
) -> ModelProto {
    ModelProto {
        ir_version: Some(10),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(opset) }],
        graph: Some(GraphProto {
            name: Some("test".into()),
            node: nodes,
            input: inputs,
            output: outputs,
            initializer: init,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The fixtures in models/tiny: (name, folder).
pub fn tiny_models() -> Vec<(String, PathBuf)> {
    let dir = repo_root().join("models/tiny");
    let mut v: Vec<(String, PathBuf)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("model.onnx").exists())
        .map(|p| (p.file_name().unwrap().to_string_lossy().to_string(), p))
        .collect();
    v.sort();
    v
}

/// Every `.npy` in a folder, by file stem, sorted.
pub fn read_npy_dir(dir: &std::path::Path) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "npy"))
        .map(|p| (p.file_stem().unwrap().to_string_lossy().to_string(), edgec::npy::read_npy(&p).unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

pub fn attr_int(name: &str, v: i64) -> edgec::onnx::proto::AttributeProto {
    edgec::onnx::proto::AttributeProto { name: Some(name.into()), i: Some(v), r#type: Some(2), ..Default::default() }
}

pub fn attr_ints(name: &str, v: &[i64]) -> edgec::onnx::proto::AttributeProto {
    edgec::onnx::proto::AttributeProto {
        name: Some(name.into()),
        ints: v.to_vec(),
        r#type: Some(7),
        ..Default::default()
    }
}

/// Deterministic pseudo-random floats in [-1, 1).
pub fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Feeds for the models/tiny-lm graphs: 3 cached positions and 4 new tokens, batch 2.
pub fn tiny_lm_feeds(g: &edgec::ir::Graph) -> Vec<(String, Tensor)> {
    let (b, past, seq) = (2usize, 3usize, 4usize);
    let mut feeds = Vec::new();
    for &n in &g.inputs {
        let name = g.g[n].outputs[0].name.clone();
        let has_past = g.inputs.len() > 3;
        let total = if has_past { past + seq } else { seq };
        let t = match name.as_str() {
            "input_ids" => {
                let ids: Vec<i64> = (0..b * seq).map(|i| (i * 37 % 96) as i64).collect();
                let shape = if g.ty(edgec::ir::ValueRef { node: n, slot: 0 }).shape.as_ref().unwrap()[0].is_fixed() {
                    vec![1, seq]
                } else {
                    vec![b, seq]
                };
                let len = shape.iter().product();
                Tensor::from_vec(shape, ids[..len].to_vec())
            }
            // The second sequence is left-padded by one token: padding reaches the mask.
            "attention_mask" => Tensor::from_vec(
                vec![b, total],
                (0..b * total).map(|i| if i == total { 0 } else { 1 }).collect::<Vec<i64>>(),
            ),
            "position_ids" => Tensor::from_vec(
                vec![b, seq],
                (0..b * seq).map(|i| ((i % seq) + total - seq) as i64).collect::<Vec<i64>>(),
            ),
            _ => Tensor::from_vec(vec![b, 2, past, 8], noise(b * 2 * past * 8, name.len() as u64)),
        };
        feeds.push((name, t));
    }
    feeds
}

/// Deterministic token sequences (an LCG) over a vocabulary of `vocab` ids, for calibration.
#[allow(dead_code)]
pub fn token_seqs(n: usize, len: usize, vocab: u64, seed: u64) -> Vec<Vec<u32>> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            (0..len)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((x >> 33) % vocab) as u32
                })
                .collect()
        })
        .collect()
}

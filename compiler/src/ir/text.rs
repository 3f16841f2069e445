//! The IR text form: one line per node in deterministic topological order, typed
//! shapes, small constants inline and weight summaries instead of values. It is
//! what `edgec inspect` prints and what the insta snapshots hold.

use super::{Graph, Op, TensorType, ValueRef};
use crate::ir::Tensor;
use std::collections::HashMap;
use std::fmt::Write;

pub fn type_str(t: &TensorType) -> String {
    format!("{}{}", t.dtype, shape_str(&t.shape))
}

/// `[batch_size,sequence_length,576]`, or `[?]` when unknown.
pub fn shape_str(s: &crate::ir::Shape) -> String {
    match s {
        None => "[?]".into(),
        Some(dims) => {
            let d: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
            format!("[{}]", d.join(","))
        }
    }
}

fn human_bytes(n: usize) -> String {
    if n < 1024 {
        format!("{n} B")
    } else if n < 1024 * 1024 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else if n < 1024 * 1024 * 1024 {
        format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0))
    } else {
        format!("{:.2} GiB", n as f64 / (1024.0 * 1024.0 * 1024.0))
    }
}

/// Floats in plain notation when short, scientific when huge or tiny (-3.4028235e38, not 39 digits).
fn float_str(x: f32) -> String {
    let a = x.abs();
    if a != 0.0 && a.is_finite() && !(1e-4..1e6).contains(&a) {
        format!("{x:e}")
    } else {
        format!("{x}")
    }
}

/// Inline values for tiny tensors, a statistical summary for weights.
fn const_summary(t: &Tensor, bytes: usize) -> String {
    if t.len() <= 8 {
        let v: Vec<String> = t
            .to_f64_vec()
            .iter()
            .map(|&x| if t.dtype().is_float() { float_str(x as f32) } else { format!("{x}") })
            .collect();
        return format!("[{}]", v.join(", "));
    }
    let v = t.to_f64_vec();
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let std = (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n).sqrt();
    let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    format!("<{}, min={:.4} max={:.4} mean={:.4} std={:.4}>", human_bytes(bytes), min, max, mean, std)
}

pub fn render(g: &Graph) -> String {
    let order = match g.topo_order() {
        Ok(o) => o,
        Err(e) => return format!("<invalid graph: {e}>\n"),
    };
    let mut names: HashMap<ValueRef, String> = HashMap::new();
    let mut out = String::new();
    let _ = writeln!(out, "graph {:?} opset={} ops={}", g.name, g.opset, g.op_count());
    for (i, &n) in order.iter().enumerate() {
        let node = &g.g[n];
        for slot in 0..node.outputs.len() {
            let name = if node.outputs.len() == 1 { format!("%{i}") } else { format!("%{i}.{slot}") };
            names.insert(ValueRef { node: n, slot }, name);
        }
    }
    for (i, &n) in order.iter().enumerate() {
        let node = &g.g[n];
        let ty0 = type_str(&node.outputs[0].ty);
        match &node.op {
            Op::Input { .. } => {
                let _ = writeln!(out, "input %{i} {:?}: {ty0}", node.outputs[0].name);
            }
            Op::Const { id } => {
                let c = g.consts.get(*id).expect("verified");
                let _ =
                    writeln!(out, "const %{i} {:?}: {ty0} = {}", c.name, const_summary(&c.to_tensor(), c.bytes.len()));
            }
            op => {
                let lhs: Vec<String> =
                    (0..node.outputs.len()).map(|s| names[&ValueRef { node: n, slot: s }].clone()).collect();
                let args: Vec<String> =
                    g.inputs_of(n).iter().map(|v| v.map_or("_".to_string(), |v| names[&v].clone())).collect();
                let attrs = op.attrs();
                let attrs = if attrs.is_empty() { String::new() } else { format!(" {{{}}}", attrs.join(", ")) };
                let tys: Vec<String> = node.outputs.iter().map(|o| type_str(&o.ty)).collect();
                let _ = writeln!(
                    out,
                    "{} = {}({}){attrs} : {}",
                    lhs.join(", "),
                    op.name(),
                    args.join(", "),
                    tys.join(", ")
                );
            }
        }
    }
    for o in &g.outputs {
        let _ = writeln!(out, "output {:?} = {} : {}", o.name, names[&o.value], type_str(g.ty(o.value)));
    }
    out
}

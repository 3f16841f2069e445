//! QDQ activations: a MatMulNBits reading `DequantizeLinear(QuantizeLinear(x, s, z), s, z)` with one
//! constant scale (and zero point) for the whole tensor reads x instead, with the scale and zero
//! point as its static activation quantization (`nbits::ActQuant`). The meaning is the same (the
//! interpreter computes exactly those two ops), and the code generator then rounds x to int8 once
//! with the fixed scale and runs the integer dot-product kernels instead of computing the fake
//! quantization in f32 and the matmul in f32. Runs after `qdq-weights`, which turns the QDQ weights
//! of such graphs (onnxruntime's quantizer, quantization-aware training) into MatMulNBits.
//! Per-axis or blocked activation scales, or a pair whose two halves disagree, stay as written.

use super::{Pass, PassStats};
use crate::error::Result;
use crate::ir::nbits::ActQuant;
use crate::ir::{DType, Graph, Op, ValueRef};
use petgraph::stable_graph::NodeIndex;

pub struct QdqActivations;

/// The per-tensor (scale, zero point) of a QuantizeLinear or DequantizeLinear node whose
/// quantized side has type `dtype`; `None` unless both are constants with one value each.
fn per_tensor(g: &Graph, n: NodeIndex, dtype: DType) -> Option<(f32, i32)> {
    let ins = g.inputs_of(n);
    let scale = g.const_of(ins.get(1).copied().flatten()?)?.to_tensor();
    if scale.dtype() != DType::F32 || scale.len() != 1 {
        return None;
    }
    let zero = match ins.get(2).copied().flatten() {
        Some(z) => {
            let z = g.const_of(z)?.to_tensor();
            if z.dtype() != dtype || z.len() != 1 {
                return None;
            }
            z.to_i64_vec().ok()?[0] as i32
        }
        None => 0,
    };
    Some((scale.as_slice::<f32>().ok()?[0], zero))
}

/// The activation quantization of DequantizeLinear node `d` when it reads a QuantizeLinear of an
/// f32 value with the same per-tensor parameters: (x, parameters).
fn read_pair(g: &Graph, d: NodeIndex) -> Option<(ValueRef, ActQuant)> {
    let Op::DequantizeLinear { block_size: 0, .. } = g.node(d).op else { return None };
    let qv = g.inputs_of(d)[0]?;
    let Op::QuantizeLinear { saturate: true, block_size: 0, .. } = g.node(qv.node).op else { return None };
    let x = g.inputs_of(qv.node)[0]?;
    let dtype = g.ty(qv).dtype;
    if g.ty(x).dtype != DType::F32 || g.ty(ValueRef { node: d, slot: 0 }).dtype != DType::F32 {
        return None;
    }
    let q = per_tensor(g, qv.node, dtype)?;
    if per_tensor(g, d, dtype)? != q {
        return None;
    }
    Some((x, ActQuant::new(q.0, q.1, dtype).ok()?))
}

impl Pass for QdqActivations {
    fn name(&self) -> &'static str {
        "qdq-activations"
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats> {
        let mut changed = 0;
        let nodes: Vec<_> = g.g.node_indices().collect();
        for d in nodes {
            if !matches!(g.node(d).op, Op::DequantizeLinear { .. }) {
                continue;
            }
            let dq = ValueRef { node: d, slot: 0 };
            let users: Vec<_> = g
                .users_of(dq)
                .into_iter()
                .filter(|&(u, slot)| slot == 0 && matches!(g.node(u).op, Op::MatMulNBits { act: None, .. }))
                .collect();
            if users.is_empty() {
                continue;
            }
            let Some((x, act)) = read_pair(g, d) else { continue };
            // Other readers of the pair (a residual Add, ...) keep reading it.
            for (u, _) in users {
                let node = g.node(u).clone();
                let Op::MatMulNBits { k, n, bits, block_size, accuracy_level, .. } = node.op else { continue };
                let mut ins = g.inputs_of(u);
                ins[0] = Some(x);
                let op = Op::MatMulNBits { k, n, bits, block_size, accuracy_level, act: Some(act) };
                let m = g.add_node(op, node.name.clone(), &ins, node.outputs.clone());
                g.replace_uses(ValueRef { node: u, slot: 0 }, ValueRef { node: m, slot: 0 });
                changed += 1;
            }
        }
        Ok(PassStats { changed })
    }
}

//! QDQ weights: `MatMul(x, DequantizeLinear(W, scale, zero))` with a constant 8-bit W [K, N] (as
//! onnxruntime's quantizer and quantization-aware training export it: per tensor, per output
//! column, or in blocks along K) becomes `MatMulNBits` with 8-bit weights. The weights then stay
//! 8-bit in the artifact and the quantized matmul kernels read them directly, instead of constant
//! folding turning them into f32. The product is the same: both dequantize `(q - zero) * scale`
//! per weight in f32 and multiply-add.

use super::{Pass, PassStats};
use crate::error::Result;
use crate::ir::nbits::{set, NBitsLayout};
use crate::ir::{DType, Graph, Op, Tensor, ValueRef};

pub struct QdqWeights;

/// The weight's values and per-(column, block) scales and zero points, as u8 (int8 shifted by 128).
struct Weight {
    layout: NBitsLayout,
    q: Vec<u8>,
    scales: Vec<f32>,
    zeros: Vec<u8>,
}

fn const_tensor(g: &Graph, v: Option<ValueRef>) -> Option<Tensor> {
    g.const_of(v?).map(|c| c.to_tensor())
}

/// Reads DequantizeLinear(W, scale, zero) when W is a constant 8-bit K x N matrix and the scales
/// are one per tensor, per column (axis 1) or per block of K rows (axis 0 with a block size).
fn read_weight(g: &Graph, ins: &[Option<ValueRef>], axis: i64, block_size: i64) -> Option<Weight> {
    let w = const_tensor(g, ins[0])?;
    let scale = const_tensor(g, ins.get(1).copied().flatten())?;
    let zero = match ins.get(2).copied().flatten() {
        Some(z) => Some(const_tensor(g, Some(z))?),
        None => None,
    };
    if w.shape.len() != 2 || scale.dtype() != DType::F32 || !matches!(w.dtype(), DType::I8 | DType::U8) {
        return None;
    }
    if zero.as_ref().is_some_and(|z| z.dtype() != w.dtype() || z.shape != scale.shape) {
        return None;
    }
    let (k, n) = (w.shape[0], w.shape[1]);
    let axis = if axis < 0 { axis + 2 } else { axis };
    // Block size along K and, per (block, column), the index into scale / zero.
    let (bs, at): (usize, Box<dyn Fn(usize, usize) -> usize>) = match (scale.len(), axis, block_size) {
        (1, _, _) => (k, Box::new(|_, _| 0)),
        (len, 1, 0) if len == n && scale.shape.len() == 1 => (k, Box::new(|_, col| col)),
        (_, 0, b) if b > 0 && scale.shape == [k.div_ceil(b as usize), n] => {
            (b as usize, Box::new(move |blk, col| blk * n + col))
        }
        _ => return None,
    };
    let layout = NBitsLayout::new(k, n, 8, bs).ok()?;
    let shift = |x: i64| if w.dtype() == DType::I8 { (x + 128) as u8 } else { x as u8 };
    let values = w.cast(DType::I64);
    let values = values.as_slice::<i64>().ok()?;
    let scale = scale.as_slice::<f32>().ok()?;
    let zero = zero.map(|z| z.cast(DType::I64));
    let zero = zero.as_ref().map(|z| z.as_slice::<i64>()).transpose().ok()?;
    let mut q = vec![0u8; layout.b_len()];
    let (mut scales, mut zeros) = (Vec::with_capacity(n * layout.blocks()), Vec::with_capacity(n * layout.blocks()));
    for col in 0..n {
        for blk in 0..layout.blocks() {
            scales.push(scale[at(blk, col)]);
            zeros.push(shift(zero.map_or(0, |z| z[at(blk, col)])));
            for j in 0..bs.min(k - blk * bs) {
                let v = shift(values[(blk * bs + j) * n + col]);
                set(&mut q, (col * layout.blocks() + blk) * layout.blob(), j, 8, v);
            }
        }
    }
    Some(Weight { layout, q, scales, zeros })
}

impl Pass for QdqWeights {
    fn name(&self) -> &'static str {
        "qdq-weights"
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats> {
        let mut changed = 0;
        let nodes: Vec<_> = g.g.node_indices().collect();
        for d in nodes {
            let Op::DequantizeLinear { axis, block_size } = g.node(d).op else { continue };
            let dq = ValueRef { node: d, slot: 0 };
            let users = g.users_of(dq);
            let all_matmul_b = !users.is_empty()
                && users.iter().all(|&(u, slot)| {
                    g.node(u).op == Op::MatMul
                        && slot == 1
                        && g.inputs_of(u)[0].is_some_and(|a| g.ty(a).dtype == DType::F32)
                });
            if !all_matmul_b {
                continue;
            }
            let Some(w) = read_weight(g, &g.inputs_of(d), axis, block_size) else { continue };
            let l = w.layout;
            let name = g.node(d).name.clone();
            let b = g.add_const(format!("{name}.q8"), &Tensor::from_vec(vec![l.n, l.blocks(), l.blob()], w.q));
            let sc = g.add_const(format!("{name}.scales"), &Tensor::from_vec(vec![l.n * l.blocks()], w.scales));
            // Zero points of 128 everywhere are MatMulNBits' default: leave them out.
            let zp = (w.zeros.iter().any(|&z| z != l.default_zero()))
                .then(|| g.add_const(format!("{name}.zero_points"), &Tensor::from_vec(vec![w.zeros.len()], w.zeros)));
            for (u, _) in users {
                let node = g.node(u).clone();
                let a = g.inputs_of(u)[0];
                let op =
                    Op::MatMulNBits { k: l.k, n: l.n, bits: 8, block_size: l.block_size, accuracy_level: 0, act: None };
                let m = g.add_node(op, node.name.clone(), &[a, Some(b), Some(sc), zp], node.outputs.clone());
                g.replace_uses(ValueRef { node: u, slot: 0 }, ValueRef { node: m, slot: 0 });
                changed += 1;
            }
        }
        Ok(PassStats { changed })
    }
}

//! The static memory plan: where every value lives at run time, which nodes run, and the arena
//! layout. Arena buffers are sized for every symbol at its bound and share space when their
//! lifetimes (first write to last read, in execution order) do not overlap.

use std::collections::{HashMap, HashSet};

use petgraph::stable_graph::NodeIndex;

use super::emit::Loc;
use super::lower::{reads_input, scratch_bytes};
use crate::error::{Error, Result};
use crate::ir::{Dim, Graph, Op, ValueRef};
use crate::passes::shape_infer::Inferred;

/// Alignment of every buffer in the arena and the weights.
pub const ALIGN: u64 = 64;

pub struct Plan {
    /// Nodes to lower, in execution order.
    pub order: Vec<NodeIndex>,
    pub locs: HashMap<ValueRef, Loc>,
    /// Nodes whose outputs are known at compile time and are stored, not computed.
    pub known: HashSet<NodeIndex>,
    pub scratch: HashMap<NodeIndex, u64>,
    /// Graph outputs that must be copied from another location after the nodes ran.
    pub output_copies: Vec<(usize, ValueRef)>,
    pub arena_bytes: u64,
    pub weights: Vec<u8>,
    /// Bytes of values the plan placed in the arena, before reuse (for reporting).
    pub arena_unshared: u64,
    /// Matmul weights stored in column panels (see `pack_panels`) instead of row-major.
    pub packed: HashSet<ValueRef>,
    /// View nodes (Reshape, Squeeze, ...) whose output shares its input's buffer: nothing to copy.
    pub aliases: HashSet<NodeIndex>,
    /// Quantized matmul weights (MatMulNBits B), stored with their scales in `NBitsPacking` form.
    pub nbits: HashMap<ValueRef, NBitsPacking>,
    /// KV-cache Concats whose result lives in a persistent arena region (`kv_cache`).
    pub kv: HashMap<NodeIndex, KvSlot>,
    /// Pruned matmul weights stored block-sparse (`SparseWeight`) for the sparse kernel.
    pub sparse: HashMap<ValueRef, SparseWeight>,
}

/// When pruned f32 matmul weights get the block-sparse kernel (`--sparse`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SparseMode {
    /// When it is expected to pay (`SparseWeight::pays`).
    #[default]
    Auto,
    /// Never: every weight stays dense.
    Off,
    /// Whenever the weight has an all-zero four-column row at all (for benchmarks and tests).
    Always,
}

impl std::str::FromStr for SparseMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(SparseMode::Auto),
            "off" => Ok(SparseMode::Off),
            "always" => Ok(SparseMode::Always),
            _ => Err(format!("unknown sparse mode `{s}` (auto, off, always)")),
        }
    }
}

pub use super::kv_cache::KvSlot;
pub use super::layout::{pack_panels, NBitsPacking, SparsePanels, SparseWeight, PANEL_COLS};

/// A constant every use of which is the B operand of a matmul with the same orientation:
/// `Some(trans_b)` when it can be stored packed.
fn packable(g: &Graph, v: ValueRef) -> Option<bool> {
    let ty = g.ty(v);
    if ty.dtype != crate::ir::DType::F32 || ty.rank() != Some(2) {
        return None;
    }
    let mut trans = None;
    for (u, slot) in g.users_of(v) {
        let t = match (&g.node(u).op, slot) {
            (Op::MatMul, 1) | (Op::MatMulAct { nbits: None, glu: false, .. }, 1) => false,
            (Op::Gemm { trans_b, .. }, 1) => *trans_b,
            _ => return None,
        };
        if trans.is_some_and(|x| x != t) {
            return None;
        }
        trans = Some(t);
    }
    trans
}

/// The packing of the MatMulNBits (or fused MatMulAct) node reading constant `v` as its B, and
/// the packed bytes.
type NBitsOperands = (NBitsPacking, Vec<u8>);

/// `simd`: the target has vectors (integer dot products for int8 activations).
fn nbits_operands(g: &Graph, v: ValueRef, simd: bool) -> Result<Option<NBitsOperands>> {
    let users = g.users_of(v);
    let Some(&(u, 1)) = users.first() else { return Ok(None) };
    let Some((attrs, glu)) = g.node(u).op.nbits() else { return Ok(None) };
    let crate::ir::NBitsAttrs { k, n, bits, block_size, act, .. } = attrs;
    let node = g.node(u);
    if users.iter().any(|&(w, slot)| slot != 1 || g.node(w).op != node.op) {
        return Ok(None);
    }
    let err = |what: &str| Error::Invalid(format!("node `{}`: MatMulNBits {what}", node.name));
    let layout = crate::ir::nbits::NBitsLayout::new(k, n, bits, block_size).map_err(|e| err(&e))?;
    let ins = g.inputs_of(u);
    let bytes = |slot: usize| -> Result<Option<Vec<u8>>> {
        match ins.get(slot).copied().flatten() {
            None => Ok(None),
            Some(x) => g.const_of(x).map(|c| Some(c.bytes.to_vec())).ok_or_else(|| err("needs constant weights")),
        }
    };
    let b = bytes(1)?.ok_or_else(|| err("has no B"))?;
    let scales = bytes(2)?.ok_or_else(|| err("has no scales"))?;
    if g.ty(ins[2].unwrap()).dtype != crate::ir::DType::F32 || g.ty(v).dtype != crate::ir::DType::U8 {
        return Err(err("needs u8 B and f32 scales"));
    }
    let scales: Vec<f32> = scales.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    let zp = bytes(3)?;
    layout.check(b.len(), scales.len(), zp.as_ref().map(|z| z.len())).map_err(|e| err(&e))?;
    let int_dot = attrs.int8_activations() && super::layout::int_dot_ok(bits, block_size, simd);
    let no_i8_min = bits == 8 && !b.contains(&0);
    let pk = NBitsPacking { layout, asym: zp.is_some(), int_dot, act, no_i8_min };
    let (pk, mut bytes) = if !glu {
        (pk, pk.pack(&b, &scales, zp.as_deref()))
    } else {
        // SwiGLU: the gate and up halves packed one after the other, each in whole panels, so the
        // kernel finds a gate panel's up panel at a fixed offset. B, scales and zero points are all
        // per column: a half is a contiguous range of each.
        if n % 2 != 0 {
            return Err(err("glu needs an even N"));
        }
        let half = crate::ir::nbits::NBitsLayout::new(k, n / 2, bits, block_size).map_err(|e| err(&e))?;
        let hp = NBitsPacking { layout: half, ..pk };
        let (bl, sl, zl) = (half.b_len(), half.n * half.blocks(), half.n * half.zp_cols());
        let mut bytes = hp.pack(&b[..bl], &scales[..sl], zp.as_ref().map(|z| &z[..zl]));
        bytes.extend(hp.pack(&b[bl..], &scales[sl..], zp.as_ref().map(|z| &z[zl..])));
        (hp, bytes)
    };
    bytes.resize(bytes.len() + pk.touch_pad(), 0);
    Ok(Some((pk, bytes)))
}

/// A constant read only as the scales or zero points of MatMulNBits nodes whose B is constant:
/// its values live in the packed B.
fn nbits_absorbed(g: &Graph, v: ValueRef) -> bool {
    let users = g.users_of(v);
    !users.is_empty()
        && users.iter().all(|&(u, slot)| {
            g.node(u).op.nbits().is_some()
                && (slot == 2 || slot == 3)
                && g.inputs_of(u)[1].is_some_and(|b| g.const_of(b).is_some())
        })
}

/// A constant f32 [K, 2N] read only as the weight of SwiGLU MatMulActs.
fn glu_weight(g: &Graph, v: ValueRef) -> bool {
    let ty = g.ty(v);
    let users = g.users_of(v);
    ty.dtype == crate::ir::DType::F32
        && ty.rank() == Some(2)
        && !users.is_empty()
        && users
            .iter()
            .all(|&(u, slot)| slot == 1 && matches!(g.node(u).op, Op::MatMulAct { nbits: None, glu: true, .. }))
}

/// The block-sparse form of constant `v` (a matmul weight, or a SwiGLU weight's two halves) and
/// its bytes, when `mode` asks for it.
fn sparse_form(
    g: &Graph,
    v: ValueRef,
    c: &crate::ir::consts::Constant,
    mode: SparseMode,
) -> Option<(SparseWeight, Vec<u8>)> {
    if mode == SparseMode::Off {
        return None;
    }
    let (r, cols) = (*c.shape.first()?, *c.shape.get(1)?);
    // The element strides along k and n, shared by both halves of a SwiGLU weight (column ranges
    // of [K, 2N]); B is K x N, or N x K under transB.
    let (sw, ks, ns) = if glu_weight(g, v) {
        let half = cols / 2;
        let gate = SparsePanels::measure(&c.bytes, r, half, cols, 1)?;
        let up = SparsePanels::measure(&c.bytes[half * 4..], r, half, cols, 1)?;
        (SparseWeight { gate, up: Some(up) }, cols, 1)
    } else {
        let (k, n, ks, ns) = if packable(g, v)? { (cols, r, 1, cols) } else { (r, cols, cols, 1) };
        (SparseWeight { gate: SparsePanels::measure(&c.bytes, k, n, ks, ns)?, up: None }, ks, ns)
    };
    let chosen = match mode {
        SparseMode::Always => sw.has_empty_rows(),
        _ => sw.pays(),
    };
    if !chosen {
        return None;
    }
    let mut bytes = sw.gate.pack(&c.bytes, ks, ns);
    if let Some(up) = sw.up {
        bytes.extend(up.pack(&c.bytes[(cols / 2) * 4..], ks, ns));
    }
    Some((sw, bytes))
}

/// Ops whose output has the input's bytes in the same order: they can alias the input.
fn is_view(op: &Op) -> bool {
    matches!(op, Op::Identity | Op::Reshape { .. } | Op::Flatten { .. } | Op::Squeeze | Op::Unsqueeze | Op::Dropout)
}

/// `pack`: store matmul weights in column panels (targets with f32 vectors); `sparse`: when pruned
/// weights are stored block-sparse instead.
pub fn plan(
    g: &Graph,
    inferred: &Inferred,
    bound: &dyn Fn(&str) -> i64,
    pack: bool,
    sparse_mode: SparseMode,
) -> Result<Plan> {
    let topo = g.topo_order().map_err(Error::Invalid)?;
    let is_known = |n: NodeIndex| {
        let node = g.node(n);
        !matches!(node.op, Op::Input { .. } | Op::Const { .. })
            && (0..node.outputs.len()).all(|s| inferred.values.contains_key(&ValueRef { node: n, slot: s }))
    };
    // Which values are read at run time: walk back from the outputs.
    let mut needed: HashSet<ValueRef> = g.outputs.iter().map(|o| o.value).collect();
    let mut live_nodes: HashSet<NodeIndex> = HashSet::new();
    for &n in topo.iter().rev() {
        let node = g.node(n);
        if !(0..node.outputs.len()).any(|s| needed.contains(&ValueRef { node: n, slot: s })) {
            continue;
        }
        live_nodes.insert(n);
        if is_known(n) {
            continue;
        }
        for (slot, inp) in g.inputs_of(n).into_iter().enumerate() {
            if let Some(v) = inp {
                if reads_input(&node.op, slot) {
                    needed.insert(v);
                }
            }
        }
    }
    let order: Vec<NodeIndex> = topo.iter().copied().filter(|n| live_nodes.contains(n)).collect();
    let known: HashSet<NodeIndex> = order.iter().copied().filter(|&n| is_known(n)).collect();
    let pos: HashMap<NodeIndex, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();

    let mut locs: HashMap<ValueRef, Loc> = HashMap::new();
    let mut weights: Vec<u8> = Vec::new();
    let mut packed = HashSet::new();
    let mut nbits = HashMap::new();
    let mut sparse = HashMap::new();
    let mut aliases = HashSet::new();
    let mut output_copies = Vec::new();
    let mut output_of: HashMap<ValueRef, usize> = HashMap::new();
    let kv = super::kv_cache::find_kv_slots(g, bound);
    for (i, o) in g.outputs.iter().enumerate() {
        if kv.get(&o.value.node).is_some_and(|s| s.output == i) {
            // Written from the cache region by the Concat's own (guarded) copy.
            continue;
        }
        let node = g.node(o.value.node);
        let computed = !matches!(node.op, Op::Input { .. } | Op::Const { .. });
        if computed && !output_of.contains_key(&o.value) {
            output_of.insert(o.value, i);
        } else {
            output_copies.push((i, o.value));
        }
    }
    // Each arena buffer: (size, first position, last position); aliases point at their root.
    let mut buffers: Vec<(u64, usize, usize)> = Vec::new();
    let mut buffer_of: HashMap<ValueRef, usize> = HashMap::new();
    let size_of = |v: ValueRef| -> Result<u64> {
        let ty = g.ty(v);
        let shape = ty
            .shape
            .as_ref()
            .ok_or_else(|| Error::Invalid(format!("value `{}` has no known shape", g.value(v).name)))?;
        let mut n: i64 = ty.dtype.size() as i64;
        for d in shape {
            let b = d
                .upper_bound(bound)
                .ok_or_else(|| Error::Invalid(format!("value `{}` is too large", g.value(v).name)))?;
            n = n.checked_mul(b).ok_or_else(|| Error::Invalid(format!("value `{}` is too large", g.value(v).name)))?;
        }
        Ok(n as u64)
    };
    let mut scratch_buf: HashMap<NodeIndex, usize> = HashMap::new();
    for &n in &order {
        let node = g.node(n);
        let p = pos[&n];
        match &node.op {
            Op::Input { index } => {
                locs.insert(ValueRef { node: n, slot: 0 }, Loc::Input(*index));
                continue;
            }
            Op::Const { id } => {
                let c = g
                    .consts
                    .get(*id)
                    .ok_or_else(|| Error::Invalid(format!("node `{}`: missing constant", node.name)))?;
                weights.resize(weights.len().next_multiple_of(ALIGN as usize), 0);
                let v = ValueRef { node: n, slot: 0 };
                locs.insert(v, Loc::Weight(weights.len() as u64));
                if let Some((pk, bytes)) = nbits_operands(g, v, pack)? {
                    weights.extend_from_slice(&bytes);
                    nbits.insert(v, pk);
                    continue;
                }
                if nbits_absorbed(g, v) {
                    continue;
                }
                if let Some((sw, bytes)) = sparse_form(g, v, c, sparse_mode) {
                    weights.extend_from_slice(&bytes);
                    sparse.insert(v, sw);
                    continue;
                }
                if pack && glu_weight(g, v) {
                    // SwiGLU f32 weight [K, 2N]: gate and up halves packed separately.
                    let (r, cols) = (c.shape[0], c.shape[1]);
                    let half = cols / 2;
                    weights.extend_from_slice(&pack_panels(&c.bytes, r, half, cols, 1));
                    weights.extend_from_slice(&pack_panels(&c.bytes[half * 4..], r, half, cols, 1));
                    packed.insert(v);
                    continue;
                }
                match packable(g, v).filter(|_| pack) {
                    Some(trans_b) => {
                        let (r, cols) = (c.shape[0], c.shape[1]);
                        // B is K x N, or N x K under transB.
                        let bytes = if trans_b {
                            pack_panels(&c.bytes, cols, r, 1, cols)
                        } else {
                            pack_panels(&c.bytes, r, cols, cols, 1)
                        };
                        weights.extend_from_slice(&bytes);
                        packed.insert(v);
                    }
                    None => weights.extend_from_slice(&c.bytes),
                }
                continue;
            }
            _ => {}
        }
        // Reads extend the lifetime of the buffers they touch.
        if !known.contains(&n) {
            for (slot, inp) in g.inputs_of(n).into_iter().enumerate() {
                if let (Some(v), true) = (inp, reads_input(&node.op, slot)) {
                    if let Some(&b) = buffer_of.get(&v) {
                        buffers[b].2 = buffers[b].2.max(p);
                    }
                }
            }
        }
        let mut sb = scratch_bytes(&node.op);
        if let Some((crate::ir::NBitsAttrs { k, bits, block_size, .. }, _)) =
            node.op.nbits().filter(|(q, _)| q.int8_activations())
        {
            // Room for the int8 activations, one row per row of A.
            let a = g.inputs_of(n)[0].ok_or_else(|| Error::Invalid(format!("node `{}` has no A", node.name)))?;
            let rows = size_of(a)? / (4 * k.max(1) as u64);
            let int_dot = super::layout::int_dot_ok(bits, block_size, pack);
            sb = rows * super::layout::activation_row_bytes(k, block_size, int_dot) as u64;
        }
        if sb > 0 {
            scratch_buf.insert(n, buffers.len());
            buffers.push((sb, p, p));
        }
        for slot in 0..node.outputs.len() {
            let v = ValueRef { node: n, slot };
            if !needed.contains(&v) {
                continue;
            }
            if let Some(&i) = output_of.get(&v) {
                locs.insert(v, Loc::Output(i));
                continue;
            }
            if slot == 0 && is_view(&node.op) && !known.contains(&n) {
                let src = g.inputs_of(n)[0].expect("view ops have a data input");
                aliases.insert(n);
                match buffer_of.get(&src) {
                    Some(&b) => drop(buffer_of.insert(v, b)),
                    None => drop(locs.insert(v, locs[&src])),
                }
                continue;
            }
            buffer_of.insert(v, buffers.len());
            match kv.get(&n) {
                // Persistent: alive before the first node and after the last, shared with nothing.
                Some(slot) => buffers.push((slot.bytes.max(1), 0, usize::MAX)),
                None => buffers.push((size_of(v)?.max(1), p, p)),
            }
        }
    }
    // Values that feed graph outputs through a copy stay alive to the end.
    for &(_, v) in &output_copies {
        if let Some(&b) = buffer_of.get(&v) {
            buffers[b].2 = usize::MAX;
        }
    }
    let (offsets, arena_bytes) = assign_offsets(&buffers);
    let arena_unshared = buffers.iter().map(|b| b.0.next_multiple_of(ALIGN)).sum();
    for (v, b) in &buffer_of {
        locs.insert(*v, Loc::Arena(offsets[*b]));
    }
    let scratch = scratch_buf.into_iter().map(|(n, b)| (n, offsets[b])).collect();
    Ok(Plan {
        order,
        locs,
        known,
        scratch,
        output_copies,
        arena_bytes,
        weights,
        arena_unshared,
        packed,
        aliases,
        nbits,
        kv,
        sparse,
    })
}

/// Greedy placement, largest buffers first: each goes at the lowest offset that does not overlap a
/// placed buffer whose lifetime intersects its own.
fn assign_offsets(buffers: &[(u64, usize, usize)]) -> (Vec<u64>, u64) {
    let mut idx: Vec<usize> = (0..buffers.len()).collect();
    idx.sort_by_key(|&i| (std::cmp::Reverse(buffers[i].0), buffers[i].1));
    let mut placed: Vec<(u64, u64, usize, usize)> = Vec::new(); // (offset, end, first, last)
    let mut offsets = vec![0u64; buffers.len()];
    let mut total = 0u64;
    for i in idx {
        let (size, first, last) = buffers[i];
        let size = size.next_multiple_of(ALIGN);
        let mut clashes: Vec<(u64, u64)> =
            placed.iter().filter(|p| p.2 <= last && first <= p.3).map(|p| (p.0, p.1)).collect();
        clashes.sort();
        let mut off = 0u64;
        for (s, e) in clashes {
            if off + size <= s {
                break;
            }
            off = off.max(e);
        }
        offsets[i] = off;
        placed.push((off, off + size, first, last));
        total = total.max(off + size);
    }
    (offsets, total)
}

/// Symbols a dim uses, for validation.
pub fn dim_symbols(d: &Dim) -> Vec<String> {
    d.symbols().map(str::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{DType, GraphOutput, Tensor, TensorType, Value};
    use crate::passes::{quantize::Quantize, Pass};

    /// x[1, 40] @ W[40, 24], quantized to `scheme`: the packing of its B.
    fn packed(scheme: &str) -> (super::super::layout::NBitsPacking, Vec<u8>) {
        let mut g = Graph::new("t", 17);
        let ty = TensorType::new(DType::F32, vec![Dim::fixed(1), Dim::fixed(40)]);
        let x = g.add_node(Op::Input { index: 0 }, "x".into(), &[], vec![Value { name: "x".into(), ty }]);
        g.inputs.push(x);
        let w: Vec<f32> = (0..40 * 24).map(|i| (i % 7) as f32 - 3.0).collect();
        let wc = g.add_const("w".into(), &Tensor::from_vec(vec![40, 24], w));
        let y = Value { name: "y".into(), ty: TensorType::new(DType::F32, vec![Dim::fixed(1), Dim::fixed(24)]) };
        let mm = g.add_node(Op::MatMul, "mm".into(), &[Some(ValueRef { node: x, slot: 0 }), Some(wc)], vec![y]);
        g.outputs.push(GraphOutput { name: "y".into(), value: ValueRef { node: mm, slot: 0 } });
        Quantize::new(scheme.parse().unwrap(), vec![]).run(&mut g).unwrap();
        let nbits = g.g.node_indices().find(|&n| g.node(n).op.nbits().is_some()).unwrap();
        let b = g.inputs_of(nbits)[1].unwrap();
        nbits_operands(&g, b, true).unwrap().unwrap()
    }

    /// The 8-bit weight-only decode loop reads `TOUCH_AHEAD` bytes past its position: only those
    /// weights carry the padding, and every other packing is exactly its panels.
    #[test]
    fn eight_bit_weight_only_packing_is_padded_for_the_touch_ahead() {
        for (scheme, pad) in [("int8", super::super::layout::TOUCH_AHEAD), ("w8a8", 0), ("int4", 0), ("w4a8", 0)] {
            let (pk, bytes) = packed(scheme);
            assert_eq!(bytes.len(), pk.panels() * pk.panel_bytes() + pad, "{scheme}");
        }
    }
}

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
}

/// Ops whose output has the input's bytes in the same order: they can alias the input.
fn is_view(op: &Op) -> bool {
    matches!(op, Op::Identity | Op::Reshape { .. } | Op::Flatten { .. } | Op::Squeeze | Op::Unsqueeze | Op::Dropout)
}

pub fn plan(g: &Graph, inferred: &Inferred, bound: &dyn Fn(&str) -> i64) -> Result<Plan> {
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
    let mut output_copies = Vec::new();
    let mut output_of: HashMap<ValueRef, usize> = HashMap::new();
    for (i, o) in g.outputs.iter().enumerate() {
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
                locs.insert(ValueRef { node: n, slot: 0 }, Loc::Weight(weights.len() as u64));
                weights.extend_from_slice(&c.bytes);
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
        let sb = scratch_bytes(&node.op);
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
                match buffer_of.get(&src) {
                    Some(&b) => drop(buffer_of.insert(v, b)),
                    None => drop(locs.insert(v, locs[&src])),
                }
                continue;
            }
            buffer_of.insert(v, buffers.len());
            buffers.push((size_of(v)?.max(1), p, p));
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
    Ok(Plan { order, locs, known, scratch, output_copies, arena_bytes, weights, arena_unshared })
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

//! The KV cache kept in the arena.
//!
//! A decoder with past (as Optimum exports Llama) takes the cache in, `past_key_values.N.key`
//! [b, h, past, d], and hands it back one step longer, `present.N.key = Concat(past, new, axis 2)`.
//! Run as written, every token copies the whole cache in and out again. Instead each such Concat
//! gets a persistent arena region laid out [max batch, h, capacity, d]: a step writes only its new
//! rows at `past`, and the fused attention reads keys and values in place (a head is `capacity`
//! rows apart). The runtime's stateful mode passes null for those inputs and outputs, so nothing
//! else moves. Given real buffers (a plain run, a C program linking `--emit obj`), the code copies
//! the past in and the present out, so both conventions compute the same thing.

use std::collections::HashMap;

use petgraph::stable_graph::NodeIndex;

use super::lower::reads_input;
use crate::ir::{DType, Dim, Graph, Op, ValueRef};

/// One cache tensor: the Concat that appends to it, its graph input and output, its region.
#[derive(Clone, Debug)]
pub struct KvSlot {
    pub concat: NodeIndex,
    /// Index of the past input among the graph inputs.
    pub input: usize,
    /// Index of the present output among the graph outputs.
    pub output: usize,
    /// The axis that grows (2 for [b, h, seq, d]).
    pub axis: usize,
    /// Rows the region holds per (batch, head): the bound of the past length.
    pub capacity: u64,
    /// Element strides of the region, as a view of the present value.
    pub strides: Vec<Dim>,
    pub bytes: u64,
}

/// The cache Concats of `g`, keyed by Concat node. A Concat qualifies when its first operand is a
/// graph input read by nothing else, its result is a graph output, and every other reader is a
/// fused attention taking it as keys or values (the one kernel that reads the strided region).
pub fn find_kv_slots(g: &Graph, bound: &dyn Fn(&str) -> i64) -> HashMap<NodeIndex, KvSlot> {
    let mut slots = HashMap::new();
    for (output, o) in g.outputs.iter().enumerate() {
        let n = o.value.node;
        let Op::Concat { axis } = g.node(n).op else { continue };
        if g.outputs.iter().filter(|x| x.value == o.value).count() != 1 {
            continue;
        }
        let ins = g.inputs_of(n);
        let (Some(past), Some(new)) = (ins.first().copied().flatten(), ins.get(1).copied().flatten()) else {
            continue;
        };
        if ins.len() != 2 {
            continue;
        }
        let Op::Input { index } = g.node(past.node).op else { continue };
        if matches!(g.node(new.node).op, Op::Input { .. }) {
            continue;
        }
        let past_read_elsewhere = g.users_of(past).iter().any(|&(u, slot)| u != n && reads_input(&g.node(u).op, slot));
        let only_attention =
            g.users_of(o.value).iter().all(|&(u, slot)| matches!(g.node(u).op, Op::Attention { .. }) && slot != 0);
        if past_read_elsewhere || !only_attention {
            continue;
        }
        let (Some(ps), Some(ns), Some(os)) = (&g.ty(past).shape, &g.ty(new).shape, &g.ty(o.value).shape) else {
            continue;
        };
        if os.len() != 4 || axis.rem_euclid(4) != 2 || ps.len() != 4 || ns.len() != 4 {
            continue;
        }
        if g.ty(o.value).dtype != DType::F32 || g.ty(past).dtype != DType::F32 {
            continue;
        }
        // Heads and head size fixed and equal; the batch dim the same everywhere; the past length a symbol.
        let same = |a: usize| ps[a] == os[a] && ns[a] == os[a];
        if !(same(0) && same(1) && same(3) && os[1].is_fixed() && os[3].is_fixed() && ps[2].as_sym().is_some()) {
            continue;
        }
        let (Some(batch), Some(capacity)) = (os[0].upper_bound(bound), ps[2].upper_bound(bound)) else { continue };
        let (h, d) = (os[1].as_fixed().unwrap(), os[3].as_fixed().unwrap());
        let Some(elems) = [batch, h, capacity, d].iter().try_fold(1i64, |acc, &x| acc.checked_mul(x)) else {
            continue;
        };
        let strides = vec![Dim::fixed(h * capacity * d), Dim::fixed(capacity * d), Dim::fixed(d), Dim::fixed(1)];
        slots.insert(
            n,
            KvSlot {
                concat: n,
                input: index,
                output,
                axis: 2,
                capacity: capacity as u64,
                strides,
                bytes: elems as u64 * 4,
            },
        );
    }
    slots
}

/// The rows per (batch, head) of a value stored in a cache region, if it is one.
pub fn rows_of(slots: &HashMap<NodeIndex, KvSlot>, v: ValueRef) -> Option<Dim> {
    slots.get(&v.node).filter(|_| v.slot == 0).map(|s| Dim::fixed(s.capacity as i64))
}

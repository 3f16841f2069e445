//! The layers `--keep-sensitive` keeps at a higher precision, found from the graph alone (no
//! calibration data; the data-driven ranking is `sensitivity.rs`): the linear layers outside the
//! numbered transformer blocks (the lm_head, a classifier), the first and the last block, and every
//! block's value projection. These are the layers 4-bit rounding hurts most in practice:
//! llama.cpp's mixed presets give more bits to the output projection and `attn_v` for the same
//! reason, and on SmolLM2 these rules at int8 take round-to-nearest int4 from +36 % to +9 % of fp32
//! perplexity for 12 MB (README, "Sensitive layers").
//!
//! Blocks are numbered by their names, as every exporter writes them (`layers.3.`, `h.3.`,
//! `layer.3.`, `blocks.3.`); value projections are found by structure: the linear layers whose
//! output reaches attention's values (fused or not) through data movement only (reshape, transpose, concat
//! with the KV cache, GQA's expand, a bias add, the split of a merged q/k/v projection, which is
//! then kept whole).

use std::collections::{BTreeMap, HashSet};

use super::quantize::{Rule, Scheme};
use crate::calib::{linear_layers, Linear};
use crate::ir::{BinaryOp, DType, Graph, Op, ValueRef};

/// Which layers count as sensitive.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SensitiveLayers {
    /// Linear layers outside the numbered blocks (the lm_head).
    pub head: bool,
    /// Blocks kept whole at each end of the stack (1: the first and the last).
    pub end_blocks: usize,
    /// Every block's value projection.
    pub values: bool,
}

impl Default for SensitiveLayers {
    fn default() -> Self {
        SensitiveLayers { head: true, end_blocks: 1, values: true }
    }
}

/// Why a layer was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    /// Outside the numbered blocks.
    Head,
    /// In one of the first or last `end_blocks` blocks (its number).
    EndBlock(usize),
    /// Feeds an attention's values.
    Value,
}

/// The chosen linear layers (MatMul node names) and why, in graph order.
pub fn find(g: &Graph, which: SensitiveLayers) -> Vec<(String, Reason)> {
    let layers = linear_layers(g);
    let block = |l: &Linear| {
        let weight = g.const_of(l.weight).map(|c| c.name.as_str()).unwrap_or_default();
        block_index(&g.node(l.node).name).or_else(|| block_index(weight))
    };
    let blocks: Vec<Option<usize>> = layers.iter().map(block).collect();
    let last = blocks.iter().flatten().copied().max();
    let values = if which.values { value_projections(g, &layers) } else { HashSet::new() };
    let mut out = Vec::new();
    for (l, b) in layers.iter().zip(&blocks) {
        let reason = match (*b, last) {
            (None, Some(_)) if which.head => Some(Reason::Head),
            (Some(b), Some(last)) if b < which.end_blocks || b + which.end_blocks > last => Some(Reason::EndBlock(b)),
            _ if values.contains(&l.node) => Some(Reason::Value),
            _ => None,
        };
        if let Some(r) = reason {
            out.push((g.node(l.node).name.clone(), r));
        }
    }
    out
}

/// Exact-name rules giving the chosen layers `precision` (`None`: f32).
pub fn keep_rules(chosen: &[(String, Reason)], precision: Option<Scheme>) -> Vec<Rule> {
    chosen.iter().map(|(name, _)| Rule { pattern: name.clone(), exact: true, precision }).collect()
}

/// The chosen layers as a row of `edgec compile --report`.
pub fn to_json(chosen: &[(String, Reason)], precision: Option<Scheme>) -> String {
    let keep = precision.map_or("fp32".to_string(), |s| s.to_string());
    let layers: Vec<String> = chosen
        .iter()
        .map(|(name, r)| {
            let reason = match r {
                Reason::Head => "outside the blocks".to_string(),
                Reason::EndBlock(b) => format!("end block {b}"),
                Reason::Value => "value projection".to_string(),
            };
            format!(r#"{{"name":{name:?},"reason":"{reason}"}}"#)
        })
        .collect();
    format!(r#"{{"pass":"keep-sensitive","keep":"{keep}","kept":{},"layers":[{}]}}"#, chosen.len(), layers.join(","))
}

/// One line for the compile log: how many layers for each reason.
pub fn summary(chosen: &[(String, Reason)]) -> String {
    let mut blocks = BTreeMap::new();
    let (mut head, mut values) = (0, 0);
    for (_, r) in chosen {
        match r {
            Reason::Head => head += 1,
            Reason::EndBlock(b) => *blocks.entry(*b).or_insert(0) += 1,
            Reason::Value => values += 1,
        }
    }
    let in_blocks: usize = blocks.values().sum();
    let blocks: Vec<String> = blocks.iter().map(|(b, n)| format!("block {b}: {n}")).collect();
    format!(
        "{} layers: {head} outside the blocks, {in_blocks} in the end blocks ({}), {values} value projections",
        chosen.len(),
        if blocks.is_empty() { "none numbered".to_string() } else { blocks.join(", ") }
    )
}

/// The block number in a node or weight name: the number after `layers`, `layer`, `h`, `blocks`
/// or `block` (`/model/layers.3/mlp/...`, `model.layers.3.mlp.down_proj.weight`, `transformer.h.3.attn`).
pub fn block_index(name: &str) -> Option<usize> {
    let parts: Vec<&str> = name.split(['.', '/']).collect();
    parts.windows(2).find_map(|w| {
        let numbered = matches!(w[0], "layers" | "layer" | "h" | "blocks" | "block");
        if numbered && !w[1].is_empty() && w[1].bytes().all(|b| b.is_ascii_digit()) {
            w[1].parse().ok()
        } else {
            None
        }
    })
}

/// The linear layers that produce attention's values: from a fused `Attention`'s third input, or
/// the second operand of an unfused `probabilities @ V` MatMul (its first operand a Softmax,
/// perhaps through a Cast), up
/// through f32 data-movement ops (the integer shape inputs are not followed), stopping at the
/// first linear layer on each path.
fn value_projections(g: &Graph, layers: &[Linear]) -> HashSet<petgraph::stable_graph::NodeIndex> {
    let linear: HashSet<_> = layers.iter().map(|l| l.node).collect();
    // Exporters put a Cast (or Dropout, Identity) between the softmax and its MatMul.
    let from_softmax = |mut v: Option<ValueRef>| loop {
        let Some(at) = v else { return false };
        match g.node(at.node).op {
            Op::Softmax { .. } => return true,
            Op::Cast { .. } | Op::Dropout | Op::Identity => v = g.inputs_of(at.node).first().copied().flatten(),
            _ => return false,
        }
    };
    let mut found = HashSet::new();
    let mut seen = HashSet::new();
    let mut todo: Vec<ValueRef> = Vec::new();
    for n in g.g.node_indices() {
        let ins = g.inputs_of(n);
        match g.node(n).op {
            Op::Attention { .. } => todo.extend(ins.get(2).copied().flatten()),
            Op::MatMul if from_softmax(ins.first().copied().flatten()) => todo.extend(ins.get(1).copied().flatten()),
            _ => {}
        }
    }
    while let Some(v) = todo.pop() {
        if !seen.insert(v.node) {
            continue;
        }
        if linear.contains(&v.node) {
            found.insert(v.node);
            continue;
        }
        let moves_data = matches!(
            g.node(v.node).op,
            Op::Reshape { .. }
                | Op::Transpose { .. }
                | Op::Concat { .. }
                | Op::Split { .. }
                | Op::Slice
                | Op::Expand
                | Op::Tile
                | Op::Squeeze
                | Op::Unsqueeze
                | Op::Flatten { .. }
                | Op::Identity
                | Op::Binary(BinaryOp::Add)
        );
        if moves_data {
            todo.extend(g.inputs_of(v.node).into_iter().flatten().filter(|&i| g.ty(i).dtype == DType::F32));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_numbers_from_exporter_names() {
        assert_eq!(block_index("/model/layers.12/self_attn/v_proj/MatMul"), Some(12));
        assert_eq!(block_index("model.layers.0.mlp.down_proj.weight_T"), Some(0));
        assert_eq!(block_index("/transformer/h.3/attn/c_attn/MatMul"), Some(3));
        assert_eq!(block_index("/bert/encoder/layer.1/attention/self/value/MatMul"), Some(1));
        assert_eq!(block_index("/lm_head/MatMul"), None);
        assert_eq!(block_index("/model/layers/MatMul"), None);
        assert_eq!(block_index("heads.2.proj"), None);
    }
}

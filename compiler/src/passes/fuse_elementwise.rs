//! Elementwise chains: a tree of f32 unary ops and Add/Sub/Mul/Div whose intermediate values have
//! one reader each and the root's shape (leaves may broadcast) becomes one `Elementwise` op,
//! which native code runs as one loop with the intermediates in registers instead of one loop
//! and one buffer per op. Runs last, on what the other fusions left.

use std::collections::{HashMap, HashSet};

use petgraph::stable_graph::NodeIndex;

use super::pattern::{fuse_nodes, ins, is_f32, node_like, op, single_use};
use super::{Pass, PassStats};
use crate::error::Result;
use crate::ir::{BinaryOp, ElemArg, ElemStep, Graph, Op, UnaryOp, ValueRef};

pub struct FuseElementwise;

/// Ops a fused tree may contain (float in, same float out, lowered as plain expressions).
fn fusible(g: &Graph, v: ValueRef) -> bool {
    let ok_op = match op(g, v) {
        Op::Unary(u) => matches!(
            u,
            UnaryOp::Neg
                | UnaryOp::Abs
                | UnaryOp::Sqrt
                | UnaryOp::Reciprocal
                | UnaryOp::Exp
                | UnaryOp::Log
                | UnaryOp::Erf
                | UnaryOp::Tanh
                | UnaryOp::Sigmoid
                | UnaryOp::Relu
        ),
        Op::Binary(b) => matches!(b, BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul | BinaryOp::Div),
        _ => false,
    };
    ok_op && v.slot == 0 && is_f32(g, v) && ins(g, v).iter().all(|x| x.is_some_and(|x| is_f32(g, x)))
}

struct Tree {
    steps: Vec<ElemStep>,
    leaves: Vec<ValueRef>,
    nodes: Vec<NodeIndex>,
}

/// Adds `v` to the tree rooted at `root`: as a step when it can be fused, else as a leaf.
fn grow(g: &Graph, v: ValueRef, root: ValueRef, t: &mut Tree, leaf_of: &mut HashMap<ValueRef, usize>) -> ElemArg {
    let inner = v == root
        || (fusible(g, v) && single_use(g, v) && g.ty(v).shape.is_some() && g.ty(v).shape == g.ty(root).shape);
    if !inner {
        let i = *leaf_of.entry(v).or_insert_with(|| {
            t.leaves.push(v);
            t.leaves.len() - 1
        });
        return ElemArg::In(i);
    }
    let args: Vec<ElemArg> = ins(g, v).into_iter().flatten().map(|x| grow(g, x, root, t, leaf_of)).collect();
    t.steps.push(ElemStep { op: op(g, v).clone(), args });
    t.nodes.push(v.node);
    ElemArg::Step(t.steps.len() - 1)
}

impl Pass for FuseElementwise {
    fn name(&self) -> &'static str {
        "fuse-elementwise"
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats> {
        let mut absorbed: HashSet<NodeIndex> = HashSet::new();
        // Readers before producers: a root takes the largest tree that ends in it.
        fuse_nodes(g, true, |g, n| {
            let root = ValueRef { node: n, slot: 0 };
            if absorbed.contains(&n) || !fusible(g, root) || g.ty(root).shape.is_none() {
                return Ok(false);
            }
            let mut t = Tree { steps: Vec::new(), leaves: Vec::new(), nodes: Vec::new() };
            grow(g, root, root, &mut t, &mut HashMap::new());
            if t.steps.len() < 2 {
                return Ok(false);
            }
            absorbed.extend(t.nodes.iter().copied());
            let name = g.g[n].name.clone();
            let inputs: Vec<Option<ValueRef>> = t.leaves.iter().map(|&l| Some(l)).collect();
            let fused = node_like(g, root, Op::Elementwise { steps: t.steps }, name, &inputs);
            g.replace_uses(root, fused);
            Ok(true)
        })
    }
}

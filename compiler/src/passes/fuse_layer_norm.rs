//! LayerNorm fusion: the decomposition older exporters emit (opset < 17 has no
//! LayerNormalization) `d = x - mean(x, -1); d / sqrt(mean(d^2, -1) + eps) * gamma + beta`
//! becomes the existing `LayerNormalization` op (one row kernel natively). gamma and beta are
//! optional; a missing gamma becomes a vector of ones.

use super::pattern::{
    channel_operand, fuse_nodes, mean_last_axis, node_like, over_std, single_use, skip_identity, sole_consumer,
    square_of, unit_scale,
};
use super::{Pass, PassStats};
use crate::error::Result;
use crate::ir::{BinaryOp, Graph, Op, ValueRef};

pub struct FuseLayerNorm;

struct Found {
    x: ValueRef,
    eps: f64,
    out: ValueRef,
    gamma: Option<ValueRef>,
    beta: Option<ValueRef>,
}

fn find(g: &Graph, n: ValueRef) -> Option<Found> {
    let (num, var, eps) = over_std(g, n)?;
    let d = skip_identity(g, num, false)?;
    let sq = skip_identity(g, mean_last_axis(g, var)?, true)?;
    if !single_use(g, sq) || skip_identity(g, square_of(g, sq)?, false)? != d {
        return None;
    }
    // d = x - mean(x): read by the square and by the division only.
    if *super::pattern::op(g, d) != Op::Binary(BinaryOp::Sub)
        || g.users_of(d).iter().any(|&(u, _)| u != sq.node && u != n.node)
        || g.outputs.iter().any(|o| o.value == d)
    {
        return None;
    }
    let x = skip_identity(g, super::pattern::arg(g, d, 0)?, false)?;
    let mean = skip_identity(g, super::pattern::arg(g, d, 1)?, true)?;
    if !single_use(g, mean) || skip_identity(g, mean_last_axis(g, mean)?, false)? != x {
        return None;
    }
    let xt = g.ty(x);
    if !xt.dtype.is_float() || xt.shape.is_none() || g.ty(n).shape != xt.shape || g.ty(n).dtype != xt.dtype {
        return None;
    }
    let mut f = Found { x, eps, out: n, gamma: None, beta: None };
    if let Some(y) = sole_consumer(g, n) {
        if let Some(w) = channel_operand(g, y, BinaryOp::Mul, n, x) {
            f.out = y;
            f.gamma = Some(w);
        }
    }
    if let Some(y) = sole_consumer(g, f.out) {
        if let Some(b) = channel_operand(g, y, BinaryOp::Add, f.out, x) {
            f.out = y;
            f.beta = Some(b);
        }
    }
    Some(f)
}

impl Pass for FuseLayerNorm {
    fn name(&self) -> &'static str {
        "fuse-layer-norm"
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats> {
        fuse_nodes(g, false, |g, n| {
            if !matches!(g.g[n].op, Op::Binary(BinaryOp::Mul | BinaryOp::Div)) {
                return Ok(false);
            }
            let Some(f) = find(g, ValueRef { node: n, slot: 0 }) else { return Ok(false) };
            let gamma = match f.gamma {
                Some(w) => w,
                None => {
                    let name = format!("{}_ones", g.g[n].name);
                    let Some(ones) = unit_scale(g, f.x, name) else { return Ok(false) };
                    ones
                }
            };
            let name = g.g[f.out.node].name.clone();
            let op = Op::LayerNorm { axis: -1, epsilon: f.eps as f32 };
            let fused = node_like(g, f.out, op, name, &[Some(f.x), Some(gamma), f.beta]);
            g.replace_uses(f.out, fused);
            Ok(true)
        })
    }
}

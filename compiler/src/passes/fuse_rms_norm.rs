//! RMSNorm fusion: the exporters' decomposition
//! `w * (x * 1/sqrt(mean(x^2, -1) + eps))` (Pow(x,2) or Mul(x,x); ReduceMean over the last axis;
//! Div(1, .), Reciprocal or Div(x, .); identity Casts anywhere; the weight optional) becomes one
//! `RMSNormalization` op, which native code runs as one row kernel (one read pass for the sum of
//! squares, one for the output) instead of seven elementwise/reduce kernels and their buffers.

use super::pattern::{
    channel_operand, fuse_nodes, mean_last_axis, node_like, over_std, skip_identity, sole_consumer, square_of,
    unit_scale,
};
use super::{Pass, PassStats};
use crate::error::Result;
use crate::ir::{BinaryOp, Graph, Op, ValueRef};

pub struct FuseRmsNorm;

struct Found {
    x: ValueRef,
    eps: f64,
    /// The value the fused op replaces (after the weight Mul when there is one).
    out: ValueRef,
    weight: Option<ValueRef>,
}

fn find(g: &Graph, n: ValueRef) -> Option<Found> {
    let (num, var, eps) = over_std(g, n)?;
    let x = skip_identity(g, num, false)?;
    let sq = skip_identity(g, mean_last_axis(g, var)?, true)?;
    if !super::pattern::single_use(g, sq) || skip_identity(g, square_of(g, sq)?, false)? != x {
        return None;
    }
    let xt = g.ty(x);
    if !xt.dtype.is_float() || xt.shape.is_none() || g.ty(n).shape != xt.shape || g.ty(n).dtype != xt.dtype {
        return None;
    }
    let weighted = sole_consumer(g, n).and_then(|y| Some((y, channel_operand(g, y, BinaryOp::Mul, n, x)?)));
    Some(match weighted {
        Some((y, w)) => Found { x, eps, out: y, weight: Some(w) },
        None => Found { x, eps, out: n, weight: None },
    })
}

impl Pass for FuseRmsNorm {
    fn name(&self) -> &'static str {
        "fuse-rms-norm"
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats> {
        fuse_nodes(g, false, |g, n| {
            if !matches!(g.g[n].op, Op::Binary(BinaryOp::Mul | BinaryOp::Div)) {
                return Ok(false);
            }
            let Some(f) = find(g, ValueRef { node: n, slot: 0 }) else { return Ok(false) };
            let weight = match f.weight {
                Some(w) => w,
                // No weight: a scale of ones (needs a fixed channel count).
                None => {
                    let name = format!("{}_ones", g.g[n].name);
                    let Some(ones) = unit_scale(g, f.x, name) else { return Ok(false) };
                    ones
                }
            };
            let name = g.g[f.out.node].name.clone();
            let op = Op::RmsNorm { axis: -1, epsilon: f.eps as f32 };
            let fused = node_like(g, f.out, op, name, &[Some(f.x), Some(weight)]);
            g.replace_uses(f.out, fused);
            Ok(true)
        })
    }
}

//! RMSNorm fusion: the exporters' decomposition
//! `w * (x * 1/sqrt(mean(x^2, -1) + eps))` (Pow(x,2) or Mul(x,x); ReduceMean over the last axis;
//! Div(1, .), Reciprocal or Div(x, .); identity Casts anywhere; the weight optional) becomes one
//! `RMSNormalization` op, which native code runs as one row kernel (one read pass for the sum of
//! squares, one for the output) instead of seven elementwise/reduce kernels and their buffers.

use super::pattern::{channel_operand, mean_last_axis, over_std, skip_identity, sole_consumer, square_of, unit_scale};
use super::{Pass, PassStats};
use crate::error::{Error, Result};
use crate::ir::{BinaryOp, Graph, Op, Value, ValueRef};

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
        let order = g.topo_order().map_err(Error::Invalid)?;
        let mut changed = 0;
        for n in order {
            if !g.g.contains_node(n) || !matches!(g.g[n].op, Op::Binary(BinaryOp::Mul | BinaryOp::Div)) {
                continue;
            }
            let Some(f) = find(g, ValueRef { node: n, slot: 0 }) else { continue };
            let weight = match f.weight {
                Some(w) => w,
                // No weight: a scale of ones (needs a fixed channel count).
                None => {
                    let name = format!("{}_ones", g.g[n].name);
                    let Some(ones) = unit_scale(g, f.x, name) else { continue };
                    ones
                }
            };
            let out = g.value(f.out).clone();
            let name = g.g[f.out.node].name.clone();
            let fused = g.add_node(
                Op::RmsNorm { axis: -1, epsilon: f.eps as f32 },
                name,
                &[Some(f.x), Some(weight)],
                vec![Value { name: out.name, ty: out.ty }],
            );
            g.replace_uses(f.out, ValueRef { node: fused, slot: 0 });
            changed += 1;
        }
        if changed > 0 {
            super::dce::Dce.run(g)?;
        }
        Ok(PassStats { changed })
    }
}

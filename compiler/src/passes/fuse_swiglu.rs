//! SwiGLU fusion: the Llama/SmolLM2 MLP's `silu(x @ Wg) * (x @ Wu)`, exported as
//! `Mul(Mul(g, Sigmoid(g)), u)`, with g and u matmuls of the same input and constant weights of
//! the same scheme (both f32, or MatMulNBits with the same bits / block size / accuracy), becomes
//! one `MatMulAct { act: silu, glu }` whose weight is [Wg | Wu] concatenated along N at compile
//! time (for MatMulNBits a concatenation of per-column records). The kernel computes each output
//! tile's gate and up columns back to back and stores `silu(gate) * up`: one matmul launch, and
//! neither the two [rows, N] products nor the silu are ever written out. down_proj stays separate.

use super::pattern::{
    act_inputs, arg, concat_nbits, concat_weights, fuse_nodes, linear, node_like, op, same_scheme, single_use, Linear,
};
use super::{Pass, PassStats};
use crate::error::Result;
use crate::ir::{Act, BinaryOp, Graph, Op, UnaryOp, ValueRef};

pub struct FuseSwiGlu;

/// `v` is `silu(g)` = Mul(g, Sigmoid(g)) with both single-use: g.
fn silu_of(g: &Graph, v: ValueRef) -> Option<ValueRef> {
    if *op(g, v) != Op::Binary(BinaryOp::Mul) || !single_use(g, v) {
        return None;
    }
    let (a, b) = (arg(g, v, 0)?, arg(g, v, 1)?);
    [(a, b), (b, a)].into_iter().find_map(|(x, s)| {
        let ok = *op(g, s) == Op::Unary(UnaryOp::Sigmoid) && single_use(g, s) && arg(g, s, 0) == Some(x);
        // The gate product feeds exactly the Sigmoid and this Mul.
        (ok && g.users_of(x).len() == 2 && !g.outputs.iter().any(|o| o.value == x)).then_some(x)
    })
}

/// A plain linear (no epilogue yet) whose output is read only where the pattern reads it.
fn plain(g: &Graph, v: ValueRef) -> Option<Linear> {
    let l = linear(g, v)?;
    (l.act == Act::None && l.bias.is_none()).then_some(l)
}

fn find(g: &Graph, root: ValueRef) -> Option<(Linear, Linear)> {
    if *op(g, root) != Op::Binary(BinaryOp::Mul) {
        return None;
    }
    let (a, b) = (arg(g, root, 0)?, arg(g, root, 1)?);
    [(a, b), (b, a)].into_iter().find_map(|(s, u)| {
        let gate = plain(g, silu_of(g, s)?)?;
        let up = plain(g, u)?;
        let ok = single_use(g, u) && same_scheme(&gate, &up) && gate.n == up.n && g.ty(root).shape == g.ty(u).shape;
        ok.then_some((gate, up))
    })
}

impl Pass for FuseSwiGlu {
    fn name(&self) -> &'static str {
        "fuse-swiglu"
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats> {
        fuse_nodes(g, false, |g, node| {
            let root = ValueRef { node, slot: 0 };
            let Some((gate, up)) = find(g, root) else { return Ok(false) };
            let name = g.g[node].name.clone();
            let w = concat_weights(g, &[gate.clone(), up.clone()], &format!("{}+up", g.g[gate.node].name));
            let nbits = concat_nbits(&[gate.clone(), up]);
            let op = Op::MatMulAct { act: Act::Silu, glu: true, nbits };
            let fused = node_like(g, root, op, name, &act_inputs(gate.a, &w, nbits.is_some(), None));
            g.replace_uses(root, fused);
            Ok(true)
        })
    }
}

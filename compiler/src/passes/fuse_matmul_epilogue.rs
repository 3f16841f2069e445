//! MatMul epilogue fusion: `act(x @ W + bias)` (W constant, f32 or MatMulNBits; the bias a
//! constant per output column; the activation Relu, Sigmoid, Tanh, Gelu, SiLU `x * sigmoid(x)`,
//! or the exporters' GELU decompositions, erf form and GPT-2's tanh form) and `Gemm(x, W, c)`
//! become one `MatMulAct`, whose kernel adds the bias and applies the activation to each output
//! tile while it is still in registers: the product is written once instead of being written,
//! re-read by the Add, re-read by every op of the activation chain.

use petgraph::stable_graph::NodeIndex;

use super::pattern::{act_inputs, arg, fuse_nodes, linear, node_like, op, scalar, single_use, Linear};
use super::{Pass, PassStats};
use crate::error::Result;
use crate::ir::{Act, BinaryOp, Graph, Op, Tensor, UnaryOp, ValueRef};

pub struct FuseMatMulEpilogue;

fn near(x: Option<f64>, want: f64) -> bool {
    x.is_some_and(|x| (x - want).abs() <= 1e-4 * want.abs().max(1e-3))
}

/// The factors of the product rooted at `v`: Mul nodes (single-use below the root) are opened,
/// scalar constants multiplied into `c`, other values listed.
fn factors(g: &Graph, v: ValueRef, root: bool, c: &mut f64, leaves: &mut Vec<ValueRef>, nodes: &mut Vec<NodeIndex>) {
    if *op(g, v) == Op::Binary(BinaryOp::Mul) && (root || single_use(g, v)) {
        if let (Some(a), Some(b)) = (arg(g, v, 0), arg(g, v, 1)) {
            nodes.push(v.node);
            factors(g, a, false, c, leaves, nodes);
            factors(g, b, false, c, leaves, nodes);
            return;
        }
    }
    match scalar(g, v) {
        Some(s) => *c *= s,
        None => leaves.push(v),
    }
}

/// `v` (single-use) is `op(..)`: its inputs, and `v`'s node recorded.
fn inner(g: &Graph, v: ValueRef, want: &Op, nodes: &mut Vec<NodeIndex>) -> Option<Vec<ValueRef>> {
    if op(g, v) != want || !single_use(g, v) {
        return None;
    }
    nodes.push(v.node);
    super::pattern::ins(g, v).into_iter().collect()
}

/// `v` is `1 + f(..)` (Add, either order) with `f` the op `want`: f's input.
fn one_plus(g: &Graph, v: ValueRef, want: UnaryOp, nodes: &mut Vec<NodeIndex>) -> Option<ValueRef> {
    let [a, b] = inner(g, v, &Op::Binary(BinaryOp::Add), nodes)?[..] else { return None };
    let t = if near(scalar(g, a), 1.0) {
        b
    } else if near(scalar(g, b), 1.0) {
        a
    } else {
        return None;
    };
    inner(g, t, &Op::Unary(want), nodes)?.first().copied()
}

/// The activation computed at `root`: (activation, its input, the nodes it consists of).
fn activation(g: &Graph, root: ValueRef) -> Option<(Act, ValueRef, Vec<NodeIndex>)> {
    let unary = match op(g, root) {
        Op::Unary(UnaryOp::Relu) => Some(Act::Relu),
        Op::Unary(UnaryOp::Sigmoid) => Some(Act::Sigmoid),
        Op::Unary(UnaryOp::Tanh) => Some(Act::Tanh),
        Op::Unary(UnaryOp::Gelu { tanh_approx }) => Some(if *tanh_approx { Act::GeluTanh } else { Act::Gelu }),
        Op::Binary(BinaryOp::Mul) => None,
        _ => return None,
    };
    if let Some(a) = unary {
        return Some((a, arg(g, root, 0)?, vec![root.node]));
    }
    let (mut c, mut leaves, mut nodes) = (1.0, Vec::new(), Vec::new());
    factors(g, root, true, &mut c, &mut leaves, &mut nodes);
    let [p, q] = leaves[..] else { return None };
    for (x, other) in [(p, q), (q, p)] {
        let mut n = nodes.clone();
        // SiLU: x * sigmoid(x).
        if near(Some(c), 1.0) && inner(g, other, &Op::Unary(UnaryOp::Sigmoid), &mut n).is_some_and(|i| i[0] == x) {
            return Some((Act::Silu, x, n));
        }
        if !near(Some(c), 0.5) {
            continue;
        }
        // GELU: 0.5 x (1 + erf(x / sqrt 2)).
        let mut n = nodes.clone();
        if let Some(z) = one_plus(g, other, UnaryOp::Erf, &mut n) {
            let (mut cz, mut lz) = (1.0, Vec::new());
            if *op(g, z) == Op::Binary(BinaryOp::Div) && single_use(g, z) {
                n.push(z.node);
                if arg(g, z, 0) == Some(x) && near(scalar(g, arg(g, z, 1)?), std::f64::consts::SQRT_2) {
                    return Some((Act::Gelu, x, n));
                }
            } else if single_use(g, z) {
                factors(g, z, true, &mut cz, &mut lz, &mut n);
                if lz == [x] && near(Some(cz), std::f64::consts::FRAC_1_SQRT_2) {
                    return Some((Act::Gelu, x, n));
                }
            }
            continue;
        }
        // GELU, tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
        let mut n = nodes.clone();
        let Some(t) = one_plus(g, other, UnaryOp::Tanh, &mut n) else { continue };
        if !single_use(g, t) {
            continue;
        }
        let (mut ct, mut lt) = (1.0, Vec::new());
        factors(g, t, true, &mut ct, &mut lt, &mut n);
        let [s] = lt[..] else { continue };
        if !near(Some(ct), (2.0 / std::f64::consts::PI).sqrt()) {
            continue;
        }
        let Some([a, b]) =
            inner(g, s, &Op::Binary(BinaryOp::Add), &mut n).and_then(|v| <[ValueRef; 2]>::try_from(v).ok())
        else {
            continue;
        };
        let cube = if a == x {
            b
        } else if b == x {
            a
        } else {
            continue;
        };
        if !single_use(g, cube) {
            continue;
        }
        let (mut cc, mut lc) = (1.0, Vec::new());
        factors(g, cube, true, &mut cc, &mut lc, &mut n);
        let cubed = match lc[..] {
            [x1, x2, x3] => x1 == x && x2 == x && x3 == x,
            [p3] => {
                let ok = *op(g, p3) == Op::Binary(BinaryOp::Pow)
                    && single_use(g, p3)
                    && arg(g, p3, 0) == Some(x)
                    && near(scalar(g, arg(g, p3, 1)?), 3.0);
                n.push(p3.node);
                ok
            }
            _ => false,
        };
        if cubed && near(Some(cc), 0.044715) {
            return Some((Act::GeluTanh, x, n));
        }
    }
    None
}

/// The activation reading `v` that can be fused: every reader of `v` belongs to it.
fn activation_of(g: &Graph, v: ValueRef) -> Option<(Act, ValueRef)> {
    if g.outputs.iter().any(|o| o.value == v) {
        return None;
    }
    // The root is at most a few ops below `v`: walk its readers' outputs breadth first.
    let mut seen = vec![v];
    let mut frontier = vec![v];
    for _ in 0..6 {
        let mut next = Vec::new();
        for f in frontier {
            for (u, _) in g.users_of(f) {
                let o = ValueRef { node: u, slot: 0 };
                if !seen.contains(&o) {
                    seen.push(o);
                    next.push(o);
                }
            }
        }
        frontier = next;
    }
    seen.into_iter().skip(1).find_map(|root| {
        let (act, x, nodes) = activation(g, root)?;
        let inside = |x: ValueRef| g.users_of(x).iter().all(|(u, _)| nodes.contains(u));
        let closed = x == v
            && inside(v)
            && nodes.iter().all(|&n| n == root.node || inside(ValueRef { node: n, slot: 0 }))
            && g.ty(root) == g.ty(v);
        closed.then_some((act, root))
    })
}

/// `y`'s only reader is a Reshape keeping the last axis (n): its output.
fn reshape_of(g: &Graph, y: ValueRef, n: usize) -> Option<ValueRef> {
    if !single_use(g, y) {
        return None;
    }
    let r = ValueRef { node: g.users_of(y)[0].0, slot: 0 };
    let last = |v: ValueRef| super::pattern::shape(g, v).and_then(|s| s.last()).and_then(|d| d.as_fixed());
    (matches!(op(g, r), Op::Reshape { .. }) && last(r) == Some(n as i64) && last(y) == Some(n as i64)).then_some(r)
}

/// `y`'s only reader adds a constant f32 vector over its last axis: (bias, the sum).
fn bias_of(g: &Graph, y: ValueRef, n: usize) -> Option<(ValueRef, ValueRef)> {
    if !single_use(g, y) {
        return None;
    }
    let s = ValueRef { node: g.users_of(y)[0].0, slot: 0 };
    if *op(g, s) != Op::Binary(BinaryOp::Add) || g.ty(s) != g.ty(y) {
        return None;
    }
    let other = if arg(g, s, 0) == Some(y) { arg(g, s, 1)? } else { arg(g, s, 0)? };
    let c = g.const_of(other)?;
    (super::pattern::is_f32(g, other) && c.numel() == n && c.shape.last() == Some(&n)).then_some((other, s))
}

/// Gemm(x, W, c) with constant W and c, alpha 1, x not transposed: the equivalent linear (W
/// transposed at compile time under transB, c * beta as the bias), as new constants.
fn gemm_linear(g: &mut Graph, node: NodeIndex) -> Option<(Linear, Option<ValueRef>)> {
    let Op::Gemm { alpha, beta, trans_a: false, trans_b } = g.g[node].op.clone() else { return None };
    let i = g.inputs_of(node);
    let (a, w) = (i[0]?, i[1]?);
    if alpha != 1.0 || !super::pattern::is_f32(g, a) || g.ty(a).rank() != Some(2) {
        return None;
    }
    let wt = g.const_of(w)?.to_tensor();
    let [r, c] = wt.shape[..] else { return None };
    let (k, n) = if trans_b { (c, r) } else { (r, c) };
    let bias = match i.get(2).copied().flatten() {
        None => None,
        Some(b) => {
            let bt = g.const_of(b)?.to_tensor();
            if bt.len() != n || bt.shape.last() != Some(&n) || !super::pattern::is_f32(g, b) {
                return None;
            }
            Some(bt.as_slice::<f32>().ok()?.iter().map(|v| v * beta).collect::<Vec<f32>>())
        }
    };
    let name = g.g[node].name.clone();
    let w = if trans_b {
        let src = wt.as_slice::<f32>().ok()?;
        let mut t = vec![0f32; k * n];
        for kk in 0..k {
            for nn in 0..n {
                t[kk * n + nn] = src[nn * k + kk];
            }
        }
        g.add_const(format!("{name}.weight_T"), &Tensor::from_vec(vec![k, n], t))
    } else {
        w
    };
    let bias = bias.map(|b| g.add_const(format!("{name}.bias"), &Tensor::from_vec(vec![n], b)));
    let l = Linear { node, a, w: vec![Some(w)], nbits: None, k, n, act: Act::None, bias: None };
    Some((l, bias))
}

impl Pass for FuseMatMulEpilogue {
    fn name(&self) -> &'static str {
        "fuse-matmul-epilogue"
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats> {
        fuse_nodes(g, false, |g, node| {
            let y = ValueRef { node, slot: 0 };
            let (l, gemm_bias) = match &g.g[node].op {
                Op::MatMul | Op::MatMulNBits { .. } => match linear(g, y) {
                    Some(l) => (l, None),
                    None => return Ok(false),
                },
                Op::Gemm { .. } => {
                    // Only a Gemm whose weight is constant; a bare one is fused for its bias.
                    if g.inputs_of(node).get(1).copied().flatten().is_none_or(|w| g.const_of(w).is_none()) {
                        return Ok(false);
                    }
                    match gemm_linear(g, node) {
                        Some(x) => x,
                        None => return Ok(false),
                    }
                }
                _ => return Ok(false),
            };
            let (bias, mut out) = match gemm_bias {
                Some(b) => (Some(b), y),
                None => match bias_of(g, y, l.n) {
                    Some((b, s)) => (Some(b), s),
                    None => (None, y),
                },
            };
            // The activation may read the product through a Reshape that keeps the last axis
            // (GPT-2's Conv1D reshapes the 2-D Gemm back to [batch, seq, n]): it commutes.
            let reshaped = reshape_of(g, out, l.n);
            let mut reshape = None;
            let act = match activation_of(g, out) {
                Some((act, root)) => {
                    out = root;
                    act
                }
                None => match reshaped.and_then(|r| Some((r, activation_of(g, r)?))) {
                    Some((r, (act, root))) => {
                        reshape = Some((r, root));
                        act
                    }
                    None => Act::None,
                },
            };
            // A bare MatMul gains nothing.
            if bias.is_none() && act == Act::None && !matches!(g.g[node].op, Op::Gemm { .. }) {
                return Ok(false);
            }
            let name = g.g[node].name.clone();
            let inputs = act_inputs(l.a, &l.w, l.nbits.is_some(), bias);
            let fused_out = node_like(g, out, Op::MatMulAct { act, glu: false, nbits: l.nbits }, name, &inputs);
            match reshape {
                None => g.replace_uses(out, fused_out),
                Some((r, root)) => {
                    // act(reshape(y)) = reshape(act(y)): a new Reshape of the fused output.
                    let rn = g.g[r.node].clone();
                    let shape = g.inputs_of(r.node).get(1).copied().flatten();
                    let nr = node_like(g, root, rn.op, rn.name, &[Some(fused_out), shape]);
                    g.replace_uses(root, nr);
                }
            }
            Ok(true)
        })
    }
}

//! Small graph-matching helpers shared by the fusion passes (`fuse_*`): walking producers through
//! ops that do not change values, reading scalar constants and checking that an intermediate
//! value has no reader besides the chain being fused.

use crate::ir::{DType, Dim, Graph, Op, ReduceKind, ValueRef};

/// A constant of ones over `x`'s last (fixed) axis, in its dtype: the scale of a normalisation
/// written without one. `None` when that axis is symbolic.
pub fn unit_scale(g: &mut Graph, x: ValueRef, name: String) -> Option<ValueRef> {
    let ty = g.ty(x).clone();
    let d = ty.shape.as_ref().and_then(|s| s.last()).and_then(|d| d.as_fixed())? as usize;
    let ones = crate::ir::Tensor::from_vec(vec![d], vec![1.0f32; d]).cast(ty.dtype);
    Some(g.add_const(name, &ones))
}

/// The op producing `v`.
pub fn op(g: &Graph, v: ValueRef) -> &Op {
    &g.g[v.node].op
}

/// The node's input slots (`None` when absent).
pub fn ins(g: &Graph, v: ValueRef) -> Vec<Option<ValueRef>> {
    g.inputs_of(v.node)
}

/// Whether `v` is read by exactly one node input and is not a graph output: a chain through it
/// can be replaced without keeping it alive.
pub fn single_use(g: &Graph, v: ValueRef) -> bool {
    g.users_of(v).len() == 1 && !g.outputs.iter().any(|o| o.value == v)
}

/// Follows `v` up through ops that return their input unchanged (Identity, Cast to the same
/// dtype, inference Dropout), also requiring every skipped value to be single-use when `strict`.
pub fn skip_identity(g: &Graph, mut v: ValueRef, strict: bool) -> Option<ValueRef> {
    loop {
        let node = &g.g[v.node];
        let src = match &node.op {
            Op::Identity => g.inputs_of(v.node)[0],
            Op::Cast { to } => g.inputs_of(v.node)[0].filter(|x| g.ty(*x).dtype == *to),
            // Dropout's mask output (slot 1) is not the data.
            Op::Dropout if v.slot == 0 && !dropout_training(g, v) => g.inputs_of(v.node)[0],
            _ => None,
        };
        let Some(src) = src else { return Some(v) };
        if strict && !single_use(g, v) {
            return None;
        }
        v = src;
    }
}

/// A Dropout whose training_mode input may be true (not a constant false) is not an identity.
fn dropout_training(g: &Graph, v: ValueRef) -> bool {
    match g.inputs_of(v.node).get(2).copied().flatten() {
        None => false,
        Some(t) => scalar(g, t).is_none_or(|x| x != 0.0),
    }
}

/// The value of a one-element constant (any dtype), as f64.
pub fn scalar(g: &Graph, v: ValueRef) -> Option<f64> {
    let c = g.const_of(v)?;
    if c.numel() != 1 {
        return None;
    }
    c.to_tensor().to_f64_vec().first().copied()
}

/// Input `i` of the producer of `v`, through identity ops (strict: the skipped values single-use).
pub fn arg(g: &Graph, v: ValueRef, i: usize) -> Option<ValueRef> {
    ins(g, v).get(i).copied().flatten()
}

/// The two operands of a commutative binary op, in both orders.
pub fn both_orders(g: &Graph, v: ValueRef) -> Option<[(ValueRef, ValueRef); 2]> {
    let (a, b) = (arg(g, v, 0)?, arg(g, v, 1)?);
    Some([(a, b), (b, a)])
}

/// `v` is a ReduceMean over the last axis only with keepdims: its input.
pub fn mean_last_axis(g: &Graph, v: ValueRef) -> Option<ValueRef> {
    let Op::Reduce { kind: ReduceKind::Mean, axes, keepdims: true, .. } = op(g, v) else { return None };
    let x = arg(g, v, 0)?;
    let rank = g.ty(x).rank()? as i64;
    let axes: Vec<i64> = match (axes, arg(g, v, 1)) {
        (Some(a), None) => a.clone(),
        (None, Some(a)) => g.const_of(a)?.to_tensor().to_i64_vec().ok()?,
        _ => return None,
    };
    (axes.len() == 1 && (axes[0] == -1 || axes[0] == rank - 1) && rank >= 1).then_some(x)
}

/// `v` squares its input: Pow(x, 2) or Mul(x, x). Returns x.
pub fn square_of(g: &Graph, v: ValueRef) -> Option<ValueRef> {
    match op(g, v) {
        Op::Binary(crate::ir::BinaryOp::Pow) if scalar(g, arg(g, v, 1)?) == Some(2.0) => arg(g, v, 0),
        Op::Binary(crate::ir::BinaryOp::Mul) if arg(g, v, 0)? == arg(g, v, 1)? => arg(g, v, 0),
        _ => None,
    }
}

/// The shape of `v` when known.
pub fn shape(g: &Graph, v: ValueRef) -> Option<&[Dim]> {
    g.ty(v).shape.as_deref()
}

/// `v` is f32.
pub fn is_f32(g: &Graph, v: ValueRef) -> bool {
    g.ty(v).dtype == DType::F32
}

/// `w` is a per-channel vector for `x`'s last axis: shape [d], d = x's last dim.
pub fn per_last_axis(g: &Graph, w: ValueRef, x: ValueRef) -> bool {
    match (shape(g, w), shape(g, x)) {
        (Some([d]), Some(xs)) => xs.last() == Some(d),
        _ => false,
    }
}

/// `n` divides by a standard deviation: `num / sqrt(var + eps)` as Div(num, s), Mul(num, 1/s) or
/// Mul(num, Reciprocal(s)), s = Sqrt(Add(var, eps)). Returns (num, var, eps); every value between
/// `var` and `n` must be single-use.
pub fn over_std(g: &Graph, n: ValueRef) -> Option<(ValueRef, ValueRef, f64)> {
    use crate::ir::{BinaryOp, UnaryOp};
    let sqrt_arg = |s: ValueRef| -> Option<(ValueRef, f64)> {
        let s = skip_identity(g, s, true)?;
        if !single_use(g, s) || *op(g, s) != Op::Unary(UnaryOp::Sqrt) {
            return None;
        }
        let e = skip_identity(g, arg(g, s, 0)?, true)?;
        if !single_use(g, e) || *op(g, e) != Op::Binary(BinaryOp::Add) {
            return None;
        }
        both_orders(g, e)?.into_iter().find_map(|(var, eps)| {
            let var = skip_identity(g, var, true)?;
            (single_use(g, var) && mean_last_axis(g, var).is_some()).then_some((var, scalar(g, eps)?))
        })
    };
    match op(g, n) {
        Op::Binary(BinaryOp::Div) => {
            let (var, eps) = sqrt_arg(arg(g, n, 1)?)?;
            Some((arg(g, n, 0)?, var, eps))
        }
        Op::Binary(BinaryOp::Mul) => both_orders(g, n)?.into_iter().find_map(|(num, r)| {
            let r = skip_identity(g, r, true)?;
            if !single_use(g, r) {
                return None;
            }
            let s = match op(g, r) {
                Op::Unary(UnaryOp::Reciprocal) => arg(g, r, 0)?,
                Op::Binary(BinaryOp::Div) if scalar(g, arg(g, r, 0)?) == Some(1.0) => arg(g, r, 1)?,
                _ => return None,
            };
            let (var, eps) = sqrt_arg(s)?;
            Some((num, var, eps))
        }),
        _ => None,
    }
}

/// The single reader of `v`, past identity ops (all single-use): the reading node's output 0.
pub fn sole_consumer(g: &Graph, v: ValueRef) -> Option<ValueRef> {
    if !single_use(g, v) {
        return None;
    }
    let (u, _) = g.users_of(v)[0];
    let out = ValueRef { node: u, slot: 0 };
    let identity = match &g.g[u].op {
        Op::Identity => true,
        Op::Cast { to } => *to == g.ty(v).dtype,
        _ => false,
    };
    if identity {
        sole_consumer(g, out)
    } else {
        Some(out)
    }
}

/// `y` (produced by a commutative Binary `kind`) combines `v` with a per-channel vector for `x`:
/// returns that vector.
pub fn channel_operand(
    g: &Graph,
    y: ValueRef,
    kind: crate::ir::BinaryOp,
    v: ValueRef,
    x: ValueRef,
) -> Option<ValueRef> {
    if *op(g, y) != Op::Binary(kind) || shape(g, y) != shape(g, x) || g.ty(y).dtype != g.ty(x).dtype {
        return None;
    }
    both_orders(g, y)?.into_iter().find_map(|(a, w)| {
        (skip_identity(g, a, true)? == v && per_last_axis(g, w, x) && g.ty(w).dtype == g.ty(x).dtype).then_some(w)
    })
}

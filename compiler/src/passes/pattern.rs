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

/// A matmul with a constant weight that the matmul fusions can extend or merge: `MatMul(A, W)`
/// (f32, W [K, N], A of rank >= 2), `MatMulNBits` with constant B / scales / zero points, or a
/// non-gated `MatMulAct` of either.
#[derive(Clone, Debug)]
pub struct Linear {
    pub node: petgraph::stable_graph::NodeIndex,
    pub a: ValueRef,
    /// The weight operands: [W] (f32) or [B, scales, zero points] (quantized).
    pub w: Vec<Option<ValueRef>>,
    pub nbits: Option<crate::ir::NBitsAttrs>,
    pub k: usize,
    pub n: usize,
    pub act: crate::ir::Act,
    pub bias: Option<ValueRef>,
}

/// `v` is the output of a matmul with constant weights (see `Linear`).
pub fn linear(g: &Graph, v: ValueRef) -> Option<Linear> {
    if v.slot != 0 {
        return None;
    }
    let node = v.node;
    let i = ins(g, v);
    let a = i.first().copied().flatten()?;
    if !is_f32(g, a) || !is_f32(g, v) || g.ty(a).rank()? < 2 {
        return None;
    }
    let constant = |x: &Option<ValueRef>| x.is_none_or(|x| g.const_of(x).is_some());
    let (nbits, act, bias, glu) = match op(g, v) {
        Op::MatMul => (None, crate::ir::Act::None, None, false),
        o @ Op::MatMulNBits { .. } => (o.nbits().map(|(q, _)| q), crate::ir::Act::None, None, false),
        o @ Op::MatMulAct { act, glu, nbits } => {
            (*nbits, *act, i.get(o.matmul_act_bias_slot()?).copied().flatten(), *glu)
        }
        _ => return None,
    };
    if glu {
        return None;
    }
    let w: Vec<Option<ValueRef>> = match nbits {
        Some(_) => (1..4).map(|s| i.get(s).copied().flatten()).collect(),
        None => vec![Some(*i.get(1)?.as_ref()?)],
    };
    if w[0].is_none() || !w.iter().all(constant) || !constant(&bias) {
        return None;
    }
    let (k, n) = match nbits {
        Some(q) => (q.k, q.n),
        None => match g.const_of(w[0]?)?.shape.as_slice() {
            [k, n] if is_f32(g, w[0]?) => (*k, *n),
            _ => return None,
        },
    };
    Some(Linear { node, a, w, nbits, k, n, act, bias })
}

/// The matmul fusions' node inputs for weight operands `w` and a bias.
pub fn act_inputs(a: ValueRef, w: &[Option<ValueRef>], nbits: bool, bias: Option<ValueRef>) -> Vec<Option<ValueRef>> {
    let mut v = vec![Some(a)];
    v.extend_from_slice(w);
    if nbits {
        v.resize(4, None);
    }
    v.push(bias);
    v
}

/// Whether two linears' weights can be concatenated along N: the same input and K, both f32 or
/// both quantized the same way (bits, block size, accuracy level, zero points or not, static
/// activation scale).
pub fn same_scheme(a: &Linear, b: &Linear) -> bool {
    a.a == b.a
        && a.k == b.k
        && match (a.nbits, b.nbits) {
            (None, None) => true,
            (Some(x), Some(y)) => {
                (x.bits, x.block_size, x.accuracy_level) == (y.bits, y.block_size, y.accuracy_level)
                    && x.act == y.act
                    && a.w[2].is_some() == b.w[2].is_some()
            }
            _ => false,
        }
}

/// The weights of `ls` (same scheme) concatenated along N as new constants named after `name`:
/// f32 W side by side; for quantized weights B, scales and zero points are per output column, so
/// each is the columns' records one after the other.
pub fn concat_weights(g: &mut Graph, ls: &[Linear], name: &str) -> Vec<Option<ValueRef>> {
    let tensor = |g: &Graph, v: ValueRef| g.const_of(v).expect("constant weight").to_tensor();
    let n: usize = ls.iter().map(|l| l.n).sum();
    if ls[0].nbits.is_none() {
        let k = ls[0].k;
        let mut out = vec![0f32; k * n];
        let mut col = 0;
        for l in ls {
            let t = tensor(g, l.w[0].unwrap());
            let w = t.as_slice::<f32>().expect("f32 weight");
            for r in 0..k {
                out[r * n + col..r * n + col + l.n].copy_from_slice(&w[r * l.n..(r + 1) * l.n]);
            }
            col += l.n;
        }
        return vec![Some(g.add_const(format!("{name}.weight"), &crate::ir::Tensor::from_vec(vec![k, n], out)))];
    }
    let mut res = Vec::new();
    for (slot, suffix) in [(0, "B"), (1, "scales"), (2, "zero_points")] {
        let Some(first) = ls[0].w[slot] else {
            res.push(None);
            continue;
        };
        let t0 = tensor(g, first);
        // Concatenated along the first (column) axis; any further axes are per column.
        let mut shape = t0.shape.clone();
        shape[0] = 0;
        let v = if t0.dtype() == DType::F32 {
            let mut all = Vec::new();
            for l in ls {
                let t = tensor(g, l.w[slot].unwrap());
                shape[0] += t.shape[0];
                all.extend_from_slice(t.as_slice::<f32>().expect("f32 scales"));
            }
            g.add_const(format!("{name}.{suffix}"), &crate::ir::Tensor::from_vec(shape, all))
        } else {
            let mut all = Vec::new();
            for l in ls {
                let t = tensor(g, l.w[slot].unwrap());
                shape[0] += t.shape[0];
                all.extend_from_slice(t.as_slice::<u8>().expect("u8 weight"));
            }
            g.add_const(format!("{name}.{suffix}"), &crate::ir::Tensor::from_vec(shape, all))
        };
        res.push(Some(v));
    }
    res
}

/// The NBits attributes of the concatenation of `ls` (None for f32).
pub fn concat_nbits(ls: &[Linear]) -> Option<crate::ir::NBitsAttrs> {
    ls[0].nbits.map(|q| crate::ir::NBitsAttrs { n: ls.iter().map(|l| l.n).sum(), ..q })
}

/// A new node (`op` over `inputs`, named `name`) whose one output has the name and type of the
/// value `like`: the fused replacement of what computed `like`.
pub fn node_like(g: &mut Graph, like: ValueRef, op: Op, name: String, inputs: &[Option<ValueRef>]) -> ValueRef {
    let v = g.value(like).clone();
    let n = g.add_node(op, name, inputs, vec![crate::ir::Value { name: v.name, ty: v.ty }]);
    ValueRef { node: n, slot: 0 }
}

/// The fusion passes' driver: `fuse` on every node still in the graph, in topological order
/// (reversed with `readers_first`, so a root takes the largest match that ends in it); `fuse`
/// says whether it rewrote something. Dead-code removal then deletes what the rewrites replaced.
pub fn fuse_nodes(
    g: &mut Graph,
    readers_first: bool,
    mut fuse: impl FnMut(&mut Graph, petgraph::graph::NodeIndex) -> crate::error::Result<bool>,
) -> crate::error::Result<super::PassStats> {
    let mut order = g.topo_order().map_err(crate::error::Error::Invalid)?;
    if readers_first {
        order.reverse();
    }
    let mut changed = 0;
    for n in order {
        if g.g.contains_node(n) && fuse(g, n)? {
            changed += 1;
        }
    }
    if changed > 0 {
        super::Pass::run(&super::dce::Dce, g)?;
    }
    Ok(super::PassStats { changed })
}

//! Shape and type inference.
//!
//! Walks the graph in topological order and computes every node's output types.
//! Besides types it tracks the *values* of small integer tensors (shapes, axes,
//! indices) as `Dim`s, because exported transformers compute their reshape
//! targets at run time (`Shape -> Gather -> Unsqueeze -> Concat -> Reshape`);
//! following those values symbolically is what turns the target into
//! `[batch, seq, 4, 16]` instead of four unknowns.
//!
//! A dim that cannot be determined becomes a fresh symbol named after the node's
//! position in topological order (`d{index}_{axis}`), so the printed IR is stable.
//! Definite contradictions between fixed dims are errors naming the node.

use crate::error::{Error, Result};
use crate::ir::{BinaryOp, DType, Dim, Graph, Node, Op, Shape, TensorType, UnaryOp, ValueRef, VariadicOp};
use std::collections::HashMap;

/// What inference knows about one value beyond its type: the elements of a small
/// integer tensor (rank 0 or 1, at most 64 elements), each a Dim (fixed or symbolic).
#[derive(Clone, Debug, Default)]
pub struct Inferred {
    pub values: HashMap<ValueRef, Vec<Dim>>,
}

/// Largest tracked value, and the largest rank we accept from a run-time shape.
const MAX_TRACKED: usize = 64;

/// Slice bounds at least this large mean "to the end" (exporters use INT_MAX or INT64_MAX).
pub const UNBOUNDED: i64 = i32::MAX as i64;

pub fn infer_shapes(g: &mut Graph) -> Result<()> {
    infer(g).map(|_| ())
}

/// Computes every node's output types in topological order (g.topo_order()) and
/// writes them into node.outputs[..].ty. Returns the symbolic values it tracked.
pub fn infer(g: &mut Graph) -> Result<Inferred> {
    let order = g.topo_order().map_err(Error::Invalid)?;
    let mut values: HashMap<ValueRef, Vec<Dim>> = HashMap::new();
    for (idx, &n) in order.iter().enumerate() {
        let (types, value) = {
            let gr: &Graph = g;
            let cx = Cx { g: gr, node: &gr.g[n], idx, ins: gr.inputs_of(n), values: &values };
            let mut types = infer_node(&cx)?;
            for (slot, ty) in types.iter_mut().enumerate() {
                ty.shape = cx.with_declared(slot, ty.shape.take());
            }
            let value = track_value(&cx, &types[0]);
            (types, value)
        };
        let node = &mut g.g[n];
        for (slot, (out, mut ty)) in node.outputs.iter_mut().zip(types).enumerate() {
            if let (0, Some(v), Some([d])) = (slot, &value, ty.shape.as_deref_mut()) {
                *d = Dim::fixed(v.len() as i64); // a known value has a known length
            }
            out.ty = ty;
        }
        if let Some(v) = value {
            values.insert(ValueRef { node: n, slot: 0 }, v);
        }
    }
    Ok(Inferred { values })
}

/// Everything one node's inference reads.
struct Cx<'a> {
    g: &'a Graph,
    node: &'a Node,
    /// Position in topological order: names fresh symbols.
    idx: usize,
    ins: Vec<Option<ValueRef>>,
    values: &'a HashMap<ValueRef, Vec<Dim>>,
}

impl Cx<'_> {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::Node {
            node: self.node.name.clone(),
            op: self.node.op.name().to_string(),
            opset: self.g.opset,
            msg: msg.into(),
        }
    }

    fn input(&self, i: usize) -> Option<ValueRef> {
        self.ins.get(i).copied().flatten()
    }

    fn has(&self, i: usize) -> bool {
        self.input(i).is_some()
    }

    /// Looked up without indexing, so an unverified graph cannot make us panic.
    fn ty(&self, i: usize) -> Option<&TensorType> {
        let v = self.input(i)?;
        self.g.g.node_weight(v.node)?.outputs.get(v.slot).map(|o| &o.ty)
    }

    fn dtype(&self, i: usize) -> DType {
        self.ty(i).map_or(DType::F32, |t| t.dtype)
    }

    fn shape(&self, i: usize) -> Option<&[Dim]> {
        self.ty(i)?.shape.as_deref()
    }

    fn rank(&self, i: usize) -> Option<usize> {
        self.shape(i).map(|s| s.len())
    }

    fn same(&self, i: usize) -> Shape {
        self.shape(i).map(|s| s.to_vec())
    }

    fn value(&self, i: usize) -> Option<&[Dim]> {
        self.values.get(&self.input(i)?).map(|v| v.as_slice())
    }

    fn fixed_value(&self, i: usize) -> Option<Vec<i64>> {
        all_fixed(self.value(i)?)
    }

    /// A list input (shape, axes, repeats) must be 0-D or 1-D.
    fn check_list(&self, i: usize, what: &str) -> Result<()> {
        match self.rank(i) {
            Some(r) if r > 1 => Err(self.err(format!("the {what} input must be 1-D, got rank {r}"))),
            _ => Ok(()),
        }
    }

    /// The number of elements of a list input, from its value or its fixed shape.
    fn list_len(&self, i: usize) -> Option<usize> {
        if let Some(v) = self.value(i) {
            return Some(v.len());
        }
        match self.shape(i)? {
            [] => Some(1),
            [d] => usize::try_from(d.as_fixed()?).ok().filter(|&n| n <= MAX_TRACKED),
            _ => None,
        }
    }

    fn fresh(&self, slot: usize, axis: usize) -> Dim {
        Dim::sym(&fresh_name(self.idx, slot, axis))
    }

    fn fresh_shape(&self, slot: usize, rank: usize) -> Vec<Dim> {
        (0..rank).map(|a| self.fresh(slot, a)).collect()
    }

    /// Normalizes a possibly negative axis against `rank`.
    fn axis(&self, axis: i64, rank: usize) -> Result<usize> {
        let r = rank as i64;
        let a = if axis < 0 { axis + r } else { axis };
        if (0..r).contains(&a) {
            Ok(a as usize)
        } else {
            Err(self.err(format!("axis {axis} is out of range for rank {rank}")))
        }
    }

    /// Normalizes a list of axes, rejecting repeats.
    fn axes(&self, axes: &[i64], rank: usize) -> Result<Vec<usize>> {
        let mut out = Vec::with_capacity(axes.len());
        for &a in axes {
            let a = self.axis(a, rank)?;
            if out.contains(&a) {
                return Err(self.err(format!("axis {a} is repeated")));
            }
            out.push(a);
        }
        Ok(out)
    }

    /// Where inference left a dim (or the whole shape) unknown, a shape the ONNX
    /// model declared for this value is better than a fresh symbol.
    fn with_declared(&self, slot: usize, inferred: Shape) -> Shape {
        let declared = self.node.outputs.get(slot).and_then(|o| o.ty.shape.as_deref());
        if matches!(self.node.op, Op::Input { .. } | Op::Const { .. }) {
            return inferred;
        }
        // Fresh symbols from an earlier run are named after old positions: never reuse them.
        let usable = |d: &Dim| !d.as_sym().is_some_and(is_fresh_name);
        match (inferred, declared) {
            (None, Some(decl)) => Some(
                decl.iter().enumerate().map(|(a, d)| if usable(d) { d.clone() } else { self.fresh(slot, a) }).collect(),
            ),
            (Some(mut dims), Some(decl)) if decl.len() == dims.len() => {
                for (a, (d, dd)) in dims.iter_mut().zip(decl).enumerate() {
                    if *d == self.fresh(slot, a) && usable(dd) {
                        *d = dd.clone();
                    }
                }
                Some(dims)
            }
            (inferred, _) => inferred,
        }
    }
}

fn fresh_name(idx: usize, slot: usize, axis: usize) -> String {
    if slot == 0 {
        format!("d{idx}_{axis}")
    } else {
        format!("d{idx}_{slot}_{axis}")
    }
}

/// Whether a symbol looks like one of ours (`d12_3`, `d12_1_0`).
fn is_fresh_name(s: &str) -> bool {
    s.strip_prefix('d').is_some_and(|rest| {
        rest.contains('_') && rest.split('_').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    })
}

fn all_fixed(v: &[Dim]) -> Option<Vec<i64>> {
    v.iter().map(|d| d.as_fixed()).collect()
}

fn fixed_dims(v: &[i64]) -> Vec<Dim> {
    v.iter().map(|&x| Dim::fixed(x)).collect()
}

/// Product of dims, `None` on overflow.
fn product(dims: &[Dim]) -> Option<Dim> {
    dims.iter().try_fold(Dim::fixed(1), |acc, d| acc.checked_mul(d))
}

/// Product of dims when all are fixed, in i128 so it cannot overflow for any rank we accept.
fn fixed_numel(dims: &[Dim]) -> Option<i128> {
    dims.iter().try_fold(1i128, |acc, d| acc.checked_mul(d.as_fixed()? as i128))
}

/// Two dims that must be equal: a fixed one wins over a symbol (it is more precise).
fn unify(cx: &Cx, a: &Dim, b: &Dim, what: &str) -> Result<Dim> {
    match (a.as_fixed(), b.as_fixed()) {
        (Some(x), Some(y)) if x != y => Err(cx.err(format!("{what}: {x} vs {y}"))),
        (None, Some(_)) => Ok(b.clone()),
        _ => Ok(a.clone()),
    }
}

/// Numpy broadcasting. Among the dims at one position a fixed non-1 dim wins, then
/// the first symbolic one; fixed 1 only if nothing else is there. Two different
/// symbols are not an error (they may be equal at run time): the first is kept.
fn broadcast(cx: &Cx, shapes: &[&[Dim]]) -> Result<Vec<Dim>> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out = Vec::with_capacity(rank);
    for i in 0..rank {
        let dims: Vec<&Dim> = shapes.iter().filter_map(|s| s.len().checked_sub(rank - i).map(|j| &s[j])).collect();
        let mut fixed: Option<i64> = None;
        for d in &dims {
            match (d.as_fixed(), fixed) {
                (Some(1), _) | (None, _) => {}
                (Some(v), None) => fixed = Some(v),
                (Some(v), Some(f)) if v != f => {
                    return Err(cx.err(format!("cannot broadcast dims {f} and {v} (axis {i} of the output)")))
                }
                _ => {}
            }
        }
        let d = match fixed {
            Some(f) => Dim::fixed(f),
            None => dims.iter().find(|d| !d.is_fixed()).map_or(Dim::fixed(1), |d| (*d).clone()),
        };
        out.push(d);
    }
    Ok(out)
}

/// Broadcast of every present input; unknown if any rank is unknown.
fn broadcast_inputs(cx: &Cx) -> Result<Shape> {
    let mut shapes = Vec::new();
    for i in 0..cx.ins.len() {
        if cx.has(i) {
            match cx.shape(i) {
                Some(s) => shapes.push(s),
                None => return Ok(None),
            }
        }
    }
    broadcast(cx, &shapes).map(Some)
}

/// Attention: q [b, hq, s, d], k [b, hkv, t, d], v [b, hkv, t, dv] -> [b, hq, s, dv].
fn attention(cx: &Cx) -> Result<Shape> {
    let (Some(q), Some(k), Some(v)) = (cx.shape(0), cx.shape(1), cx.shape(2)) else { return Ok(None) };
    if q.len() != 4 || k.len() != 4 || v.len() != 4 {
        return Err(cx.err(format!("q, k and v must have rank 4, got {}, {} and {}", q.len(), k.len(), v.len())));
    }
    let b = unify(cx, &q[0], &k[0], "batch")?;
    let b = unify(cx, &b, &v[0], "batch")?;
    unify(cx, &q[3], &k[3], "head size")?;
    unify(cx, &k[1], &v[1], "kv heads")?;
    unify(cx, &k[2], &v[2], "kv length")?;
    if let (Some(hq), Some(hkv)) = (q[1].as_fixed(), k[1].as_fixed()) {
        if hkv <= 0 || hq % hkv != 0 {
            return Err(cx.err(format!("{hq} query heads are not a multiple of {hkv} kv heads")));
        }
    }
    if let Some(m) = cx.shape(3) {
        let full = [b.clone(), q[1].clone(), q[2].clone(), k[2].clone()];
        if m.len() > 4 {
            return Err(cx.err(format!("mask has rank {}, at most 4 allowed", m.len())));
        }
        broadcast(cx, &[m, &full])?;
    }
    Ok(Some(vec![b, q[1].clone(), q[2].clone(), v[3].clone()]))
}

/// Output types for one node, one per output slot.
fn infer_node(cx: &Cx) -> Result<Vec<TensorType>> {
    use DType::*;
    let t = |dtype: DType, shape: Shape| TensorType { dtype, shape };
    let d0 = cx.dtype(0);
    let types = match &cx.node.op {
        Op::Input { .. } => cx.node.outputs.iter().map(|o| o.ty.clone()).collect(),
        Op::Const { id } => {
            let c = cx.g.consts.get(*id).ok_or_else(|| cx.err(format!("constant {id} is missing")))?;
            vec![TensorType::fixed(c.dtype, &c.shape)]
        }
        Op::Unary(u) => {
            let bool_out = matches!(u, UnaryOp::Not | UnaryOp::IsNaN | UnaryOp::IsInf { .. });
            vec![t(if bool_out { Bool } else { d0 }, cx.same(0))]
        }
        Op::Binary(b) => {
            let bool_out = b.is_comparison() || b.is_logical();
            vec![t(if bool_out { Bool } else { d0 }, broadcast_inputs(cx)?)]
        }
        Op::Variadic(_) | Op::Clip | Op::Elementwise { .. } => vec![t(d0, broadcast_inputs(cx)?)],
        Op::Where => vec![t(cx.dtype(1), broadcast_inputs(cx)?)],
        Op::Cast { to } => vec![t(*to, cx.same(0))],
        Op::CastLike => vec![t(cx.dtype(1), cx.same(0))],
        Op::Identity | Op::Trilu { .. } | Op::CumSum { .. } => vec![t(d0, cx.same(0))],
        Op::Dropout => vec![t(d0, cx.same(0)), t(Bool, cx.same(0))],
        Op::MatMul => vec![t(d0, matmul(cx)?)],
        Op::MatMulInteger => vec![t(I32, matmul(cx)?)],
        Op::MatMulNBits { k, n, .. } => {
            let out = cx.shape(0).map(|a| -> Result<Vec<Dim>> {
                let Some(last) = a.last() else { return Err(cx.err("MatMulNBits input A must have rank >= 1")) };
                unify(cx, last, &Dim::fixed(*k as i64), "A's last dimension is not K")?;
                Ok(a[..a.len() - 1].iter().cloned().chain([Dim::fixed(*n as i64)]).collect())
            });
            vec![t(F32, out.transpose()?)]
        }
        Op::MatMulAct { glu, nbits, .. } => {
            // The weight's K x Nw from the attributes (quantized) or W's shape.
            let kn = match nbits {
                Some(q) => Some((q.k as i64, q.n as i64)),
                None => match cx.shape(1) {
                    Some([k, n]) => k.as_fixed().zip(n.as_fixed()),
                    _ => return Err(cx.err("MatMulAct needs a 2-D weight of known shape")),
                },
            };
            let out = match (cx.shape(0), kn) {
                (Some(a), Some((k, n))) => {
                    let Some(last) = a.last() else { return Err(cx.err("MatMulAct input A must have rank >= 1")) };
                    unify(cx, last, &Dim::fixed(k), "A's last dimension is not K")?;
                    if *glu && n % 2 != 0 {
                        return Err(cx.err("MatMulAct glu needs an even number of weight columns"));
                    }
                    let n = if *glu { n / 2 } else { n };
                    Some(a[..a.len() - 1].iter().cloned().chain([Dim::fixed(n)]).collect())
                }
                _ => None,
            };
            vec![t(F32, out)]
        }
        Op::Gemm { trans_a, trans_b, .. } => vec![t(d0, gemm(cx, *trans_a, *trans_b)?)],
        Op::Softmax { axis } | Op::LogSoftmax { axis } => {
            if let Some(r) = cx.rank(0) {
                cx.axis(*axis, r)?;
            }
            vec![t(d0, cx.same(0))]
        }
        Op::LayerNorm { axis, .. } => {
            // Mean and InvStdDev keep the leading dims and are 1 from `axis` on.
            let stats = match cx.shape(0) {
                Some(x) => {
                    let a = cx.axis(*axis, x.len())?;
                    Some(x.iter().enumerate().map(|(i, d)| if i < a { d.clone() } else { Dim::fixed(1) }).collect())
                }
                None => None,
            };
            vec![t(d0, cx.same(0)), t(F32, stats.clone()), t(F32, stats)]
        }
        Op::Reduce { axes, keepdims, noop_with_empty_axes, .. } => {
            vec![t(d0, reduce(cx, axes.as_deref(), *keepdims, *noop_with_empty_axes)?)]
        }
        Op::ArgReduce { axis, keepdims, .. } => {
            let shape = match cx.shape(0) {
                Some(x) => {
                    let a = cx.axis(*axis, x.len())?;
                    let mut out = x.to_vec();
                    if *keepdims {
                        out[a] = Dim::fixed(1);
                    } else {
                        out.remove(a);
                    }
                    Some(out)
                }
                None => None,
            };
            vec![t(I64, shape)]
        }
        Op::Transpose { perm } => vec![t(d0, transpose(cx, perm.as_deref())?)],
        Op::Reshape { allowzero } => vec![t(d0, reshape(cx, *allowzero)?)],
        Op::Flatten { axis } => vec![t(d0, Some(flatten(cx, *axis)?))],
        Op::Squeeze => vec![t(d0, squeeze(cx)?)],
        Op::Unsqueeze => vec![t(d0, unsqueeze(cx)?)],
        Op::Concat { axis } => vec![t(d0, concat(cx, *axis)?)],
        Op::Split { axis, num_outputs } => split(cx, *axis, *num_outputs)?.into_iter().map(|s| t(d0, s)).collect(),
        Op::Slice => vec![t(d0, slice(cx)?)],
        Op::Expand => vec![t(d0, expand(cx)?)],
        Op::Tile => vec![t(d0, tile(cx)?)],
        Op::Shape { start, end } => {
            let len = match cx.rank(0) {
                Some(r) => {
                    let (s, e) = shape_range(*start, *end, r);
                    Dim::fixed((e - s) as i64)
                }
                None => cx.fresh(0, 0),
            };
            vec![t(I64, Some(vec![len]))]
        }
        Op::Size => vec![t(I64, Some(vec![]))],
        Op::ConstantOfShape { value } => vec![t(value.dtype(), constant_of_shape(cx)?)],
        Op::Range => vec![t(d0, Some(vec![range_len(cx)?]))],
        Op::Gather { axis } => vec![t(d0, gather(cx, *axis)?)],
        Op::GatherElements { axis } => {
            if let (Some(r), Some(ri)) = (cx.rank(0), cx.rank(1)) {
                if r != ri {
                    return Err(cx.err(format!("data has rank {r} but indices have rank {ri}")));
                }
                cx.axis(*axis, r)?;
            }
            vec![t(d0, cx.same(1))]
        }
        Op::GatherND { batch_dims } => vec![t(d0, gather_nd(cx, *batch_dims)?)],
        Op::QuantizeLinear { output_dtype, .. } => {
            let dtype = output_dtype.unwrap_or(if cx.has(2) { cx.dtype(2) } else { U8 });
            vec![t(dtype, cx.same(0))]
        }
        Op::DequantizeLinear { .. } => vec![t(F32, cx.same(0))],
        Op::DynamicQuantizeLinear => {
            vec![t(U8, cx.same(0)), t(F32, Some(vec![])), t(U8, Some(vec![]))]
        }
        Op::RmsNorm { axis, .. } => {
            if let Some(r) = cx.rank(0) {
                cx.axis(*axis, r)?;
            }
            vec![t(d0, cx.same(0))]
        }
        Op::Attention { .. } => vec![t(d0, attention(cx)?)],
    };
    let mut types: Vec<TensorType> = types;
    let n = cx.node.outputs.len();
    if n > types.len() {
        return Err(cx.err(format!("the node has {n} outputs but the op produces at most {}", types.len())));
    }
    types.truncate(n);
    Ok(types)
}

/// MatMul with numpy semantics: 1-D operands are promoted and the added dim
/// removed again; batch dims broadcast.
fn matmul(cx: &Cx) -> Result<Shape> {
    let (Some(a), Some(b)) = (cx.shape(0), cx.shape(1)) else { return Ok(None) };
    if a.is_empty() || b.is_empty() {
        return Err(cx.err("MatMul operands must have rank >= 1"));
    }
    let one = [Dim::fixed(1)];
    let a2: Vec<Dim> = if a.len() == 1 { one.iter().chain(a).cloned().collect() } else { a.to_vec() };
    let b2: Vec<Dim> = if b.len() == 1 { b.iter().chain(&one).cloned().collect() } else { b.to_vec() };
    let (ra, rb) = (a2.len(), b2.len());
    unify(cx, &a2[ra - 1], &b2[rb - 2], "inner dimensions differ")?;
    let mut out = broadcast(cx, &[&a2[..ra - 2], &b2[..rb - 2]])?;
    if a.len() > 1 {
        out.push(a2[ra - 2].clone());
    }
    if b.len() > 1 {
        out.push(b2[rb - 1].clone());
    }
    Ok(Some(out))
}

fn gemm(cx: &Cx, trans_a: bool, trans_b: bool) -> Result<Shape> {
    for i in 0..2 {
        if let Some(r) = cx.rank(i).filter(|&r| r != 2) {
            return Err(cx.err(format!("Gemm input {i} must be 2-D, got rank {r}")));
        }
    }
    let pick = |i: usize, transposed: bool| {
        cx.shape(i).map(|s| if transposed { (s[1].clone(), s[0].clone()) } else { (s[0].clone(), s[1].clone()) })
    };
    let a = pick(0, trans_a); // (M, K)
    let b = pick(1, trans_b); // (K, N)
    if let (Some((_, ka)), Some((kb, _))) = (&a, &b) {
        unify(cx, ka, kb, "inner dimensions differ")?;
    }
    let m = a.map_or_else(|| cx.fresh(0, 0), |a| a.0);
    let n = b.map_or_else(|| cx.fresh(0, 1), |b| b.1);
    Ok(Some(vec![m, n]))
}

fn reduce(cx: &Cx, attr_axes: Option<&[i64]>, keepdims: bool, noop: bool) -> Result<Shape> {
    let Some(x) = cx.shape(0) else { return Ok(None) };
    let r = x.len();
    let axes = match attr_axes {
        Some(a) => Some(a.to_vec()),
        None if !cx.has(1) => Some(Vec::new()),
        None => cx.fixed_value(1),
    };
    let Some(mut axes) = axes else {
        // Unknown axes: keepdims keeps the rank; otherwise the axes' count gives it.
        let rank = if keepdims { Some(r) } else { cx.list_len(1).and_then(|k| r.checked_sub(k)) };
        return Ok(rank.map(|rank| cx.fresh_shape(0, rank)));
    };
    if axes.is_empty() {
        if noop {
            return Ok(Some(x.to_vec()));
        }
        axes = (0..r as i64).collect();
    }
    let reduced = cx.axes(&axes, r)?;
    let out = x
        .iter()
        .enumerate()
        .filter_map(|(i, d)| match (reduced.contains(&i), keepdims) {
            (false, _) => Some(d.clone()),
            (true, true) => Some(Dim::fixed(1)),
            (true, false) => None,
        })
        .collect();
    Ok(Some(out))
}

fn transpose(cx: &Cx, perm: Option<&[i64]>) -> Result<Shape> {
    let Some(x) = cx.shape(0) else { return Ok(None) };
    let perm: Vec<i64> = match perm {
        Some(p) => p.to_vec(),
        None => (0..x.len() as i64).rev().collect(),
    };
    if perm.len() != x.len() {
        return Err(cx.err(format!("perm has {} entries for rank {}", perm.len(), x.len())));
    }
    let perm = cx.axes(&perm, x.len())?;
    Ok(Some(perm.iter().map(|&p| x[p].clone()).collect()))
}

fn reshape(cx: &Cx, allowzero: bool) -> Result<Shape> {
    if let Some(r) = cx.rank(1).filter(|&r| r != 1) {
        return Err(cx.err(format!("the shape input must be 1-D, got rank {r}")));
    }
    let Some(target) = cx.value(1) else {
        return Ok(cx.list_len(1).map(|k| cx.fresh_shape(0, k)));
    };
    let input = cx.shape(0);
    let mut out = Vec::with_capacity(target.len());
    let mut infer_at = None;
    for (i, t) in target.iter().enumerate() {
        match t.as_fixed() {
            Some(-1) => {
                if infer_at.replace(i).is_some() {
                    return Err(cx.err("the target shape has more than one -1"));
                }
                out.push(Dim::fixed(1)); // placeholder, so `out` multiplies to "the others"
            }
            Some(0) if !allowzero => {
                match input {
                    Some(s) => out.push(s.get(i).cloned().ok_or_else(|| {
                        cx.err(format!("target dim {i} is 0 (copy) but the input has rank {}", s.len()))
                    })?),
                    None => out.push(cx.fresh(0, i)),
                }
            }
            Some(v) if v < 0 => return Err(cx.err(format!("invalid target dim {v}"))),
            _ => out.push(t.clone()),
        }
    }
    let in_numel = input.and_then(fixed_numel);
    match infer_at {
        Some(i) => {
            // -1 is the element count divided by the product of the other dims.
            if let (Some(total), Some(others)) = (in_numel, fixed_numel(&out)) {
                if others != 0 && total % others != 0 {
                    return Err(cx.err(format!("cannot reshape {total} elements into a multiple of {others}")));
                }
            }
            out[i] = input
                .and_then(product)
                .zip(product(&out))
                .and_then(|(total, others)| total.checked_div_exact(&others))
                .unwrap_or_else(|| cx.fresh(0, i));
        }
        None => {
            if let (Some(a), Some(b)) = (in_numel, fixed_numel(&out)) {
                if a != b {
                    return Err(cx.err(format!("cannot reshape {a} elements into {b}")));
                }
            }
        }
    }
    Ok(Some(out))
}

fn flatten(cx: &Cx, axis: i64) -> Result<Vec<Dim>> {
    let Some(x) = cx.shape(0) else { return Ok(cx.fresh_shape(0, 2)) };
    let r = x.len() as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if !(0..=r).contains(&a) {
        return Err(cx.err(format!("axis {axis} is out of range for rank {r}")));
    }
    let (head, tail) = x.split_at(a as usize);
    Ok(vec![product(head).unwrap_or_else(|| cx.fresh(0, 0)), product(tail).unwrap_or_else(|| cx.fresh(0, 1))])
}

fn squeeze(cx: &Cx) -> Result<Shape> {
    let Some(x) = cx.shape(0) else { return Ok(None) };
    if !cx.has(1) {
        // Without axes every size-1 dim goes; symbolic dims are assumed not to be 1.
        return Ok(Some(x.iter().filter(|d| d.as_fixed() != Some(1)).cloned().collect()));
    }
    cx.check_list(1, "axes")?;
    let Some(axes) = cx.fixed_value(1) else {
        return Ok(cx.list_len(1).and_then(|k| x.len().checked_sub(k)).map(|r| cx.fresh_shape(0, r)));
    };
    let axes = cx.axes(&axes, x.len())?;
    for &a in &axes {
        if let Some(v) = x[a].as_fixed().filter(|&v| v != 1) {
            return Err(cx.err(format!("cannot squeeze axis {a} of size {v}")));
        }
    }
    Ok(Some(x.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, d)| d.clone()).collect()))
}

fn unsqueeze(cx: &Cx) -> Result<Shape> {
    cx.check_list(1, "axes")?;
    let Some(x) = cx.shape(0) else { return Ok(None) };
    let Some(axes) = cx.fixed_value(1) else {
        return Ok(cx.list_len(1).map(|k| cx.fresh_shape(0, x.len() + k)));
    };
    let rank = x.len() + axes.len();
    let axes = cx.axes(&axes, rank)?;
    let mut rest = x.iter();
    let out = (0..rank)
        .map(|i| if axes.contains(&i) { Some(Dim::fixed(1)) } else { rest.next().cloned() })
        .collect::<Option<Vec<Dim>>>()
        .ok_or_else(|| cx.err("internal: unsqueeze rank mismatch"))?;
    Ok(Some(out))
}

fn concat(cx: &Cx, axis: i64) -> Result<Shape> {
    let inputs: Vec<Option<&[Dim]>> = (0..cx.ins.len()).filter(|&i| cx.has(i)).map(|i| cx.shape(i)).collect();
    let known: Vec<&[Dim]> = inputs.iter().flatten().copied().collect();
    let Some(first) = known.first() else { return Ok(None) };
    let r = first.len();
    if let Some(s) = known.iter().find(|s| s.len() != r) {
        return Err(cx.err(format!("inputs have different ranks ({r} and {})", s.len())));
    }
    let a = cx.axis(axis, r)?;
    let mut out = first.to_vec();
    for s in &known[1..] {
        for (i, d) in s.iter().enumerate() {
            if i != a {
                out[i] = unify(cx, &out[i], d, &format!("dim {i} differs between inputs"))?;
            }
        }
    }
    // The axis is the sum of the parts; any unknown part makes it unknown.
    out[a] =
        inputs.iter().try_fold(Dim::fixed(0), |acc, s| acc.checked_add(&(*s)?[a])).unwrap_or_else(|| cx.fresh(0, a));
    Ok(Some(out))
}

fn split(cx: &Cx, axis: i64, num_outputs: Option<i64>) -> Result<Vec<Shape>> {
    let n = cx.node.outputs.len();
    let Some(x) = cx.shape(0) else { return Ok(vec![None; n]) };
    let a = cx.axis(axis, x.len())?;
    let d = &x[a];
    let sizes: Vec<Option<Dim>> = if cx.has(1) {
        cx.check_list(1, "split")?;
        match cx.value(1) {
            Some(v) => v.iter().cloned().map(Some).collect(),
            None => vec![None; n],
        }
    } else {
        if num_outputs.is_some_and(|k| k != n as i64) {
            return Err(cx.err(format!("num_outputs is {} but the node has {n} outputs", num_outputs.unwrap_or(0))));
        }
        equal_split(d, n)
    };
    if sizes.len() != n {
        return Err(cx.err(format!("{} split sizes for {n} outputs", sizes.len())));
    }
    let fixed: Option<Vec<i64>> = sizes.iter().map(|s| s.as_ref()?.as_fixed()).collect();
    if let Some(f) = &fixed {
        if let Some(v) = f.iter().find(|&&v| v < 0) {
            return Err(cx.err(format!("negative split size {v}")));
        }
        let sum: i128 = f.iter().map(|&v| v as i128).sum();
        if let Some(dv) = d.as_fixed().filter(|&dv| dv as i128 != sum) {
            return Err(cx.err(format!("split sizes add up to {sum} but axis {a} has size {dv}")));
        }
    }
    Ok((0..n)
        .map(|k| {
            let mut out = x.to_vec();
            out[a] = sizes[k].clone().unwrap_or_else(|| cx.fresh(k, a));
            Some(out)
        })
        .collect())
}

/// Equal parts, the last one smaller when the dim does not divide (ONNX 18).
fn equal_split(d: &Dim, n: usize) -> Vec<Option<Dim>> {
    if n == 0 {
        return Vec::new();
    }
    match d.as_fixed() {
        Some(v) => {
            let (v, n) = (v as i128, n as i128);
            let chunk = (v + n - 1).div_euclid(n);
            (0..n).map(|k| Some(Dim::fixed((v - chunk * k).clamp(0, chunk.max(0)) as i64))).collect()
        }
        None => vec![d.checked_div_exact(&Dim::fixed(n as i64)); n],
    }
}

fn slice(cx: &Cx) -> Result<Shape> {
    let Some(x) = cx.shape(0) else { return Ok(None) };
    let r = x.len();
    for (i, what) in [(1, "starts"), (2, "ends"), (3, "axes"), (4, "steps")] {
        cx.check_list(i, what)?;
    }
    let axes: Option<Vec<i64>> = if cx.has(3) {
        cx.fixed_value(3)
    } else {
        cx.list_len(1).or_else(|| cx.list_len(2)).map(|k| (0..k as i64).collect())
    };
    let Some(axes) = axes else { return Ok(Some(cx.fresh_shape(0, r))) };
    let axes = cx.axes(&axes, r)?;
    let steps = if cx.has(4) { cx.fixed_value(4) } else { Some(vec![1; axes.len()]) };
    let (starts, ends) = (cx.value(1), cx.value(2));
    for (len, what) in [
        (starts.map(|s| s.len()), "starts"),
        (ends.map(|e| e.len()), "ends"),
        (steps.as_ref().map(|s| s.len()), "steps"),
    ] {
        if let Some(len) = len.filter(|&l| l != axes.len()) {
            return Err(cx.err(format!("{len} {what} for {} axes", axes.len())));
        }
    }
    let mut out = x.to_vec();
    for (k, &a) in axes.iter().enumerate() {
        let step = steps.as_ref().map(|s| s[k]);
        if step == Some(0) {
            return Err(cx.err("a slice step is 0"));
        }
        let len = match (starts, ends, step) {
            (Some(s), Some(e), Some(st)) => slice_len(&x[a], &s[k], &e[k], st),
            _ => None,
        };
        out[a] = len.unwrap_or_else(|| cx.fresh(0, a));
    }
    Ok(Some(out))
}

/// The first index a Slice reads on an axis of size `d` (same assumptions as `slice_len`).
pub fn slice_start(d: &Dim, start: &Dim, step: i64) -> Option<Dim> {
    if let (Some(dv), Some(s)) = (d.as_fixed(), start.as_fixed()) {
        let (s, _) = clamp_bounds(dv as i128, s as i128, 0, step as i128);
        return Some(Dim::fixed(s as i64));
    }
    match start.as_fixed() {
        Some(s) if s < 0 => d.checked_add(start),
        Some(s) if s >= UNBOUNDED => d.checked_sub(&Dim::fixed(1)),
        _ => Some(start.clone()),
    }
}

/// ONNX's start/end clamping for a fixed dim: the (start, end) to iterate.
fn clamp_bounds(d: i128, s: i128, e: i128, step: i128) -> (i128, i128) {
    let s = if s < 0 { s + d } else { s };
    let e = if e < 0 { e + d } else { e };
    if step > 0 {
        (s.clamp(0, d), e.clamp(0, d))
    } else {
        (s.clamp(0, d - 1), e.clamp(-1, d - 1))
    }
}

/// Length of a slice of a dim. With symbolic parts it resolves negative and
/// "to the end" bounds against the dim and assumes the rest lies inside it,
/// which is what exported graphs do (`x[:, :seq]`, `x[:, -1:]`, `mask[past:past+seq]`).
fn slice_len(d: &Dim, start: &Dim, end: &Dim, step: i64) -> Option<Dim> {
    if let (Some(dv), Some(s), Some(e)) = (d.as_fixed(), start.as_fixed(), end.as_fixed()) {
        let (dv, st) = (dv as i128, step as i128);
        if dv <= 0 {
            return Some(Dim::fixed(0));
        }
        let (s, e) = clamp_bounds(dv, s as i128, e as i128, st);
        let len = if st > 0 { (e - s + st - 1) / st } else { (s - e - st - 1) / -st };
        return Some(Dim::fixed(len.max(0) as i64));
    }
    let rel = |v: i64| d.checked_add(&Dim::fixed(v)); // d + v for negative bounds
    let (from, to) = if step > 0 {
        let from = match start.as_fixed() {
            Some(s) if s >= UNBOUNDED => return Some(Dim::fixed(0)),
            Some(s) if s <= -UNBOUNDED => Dim::fixed(0),
            Some(s) if s < 0 => rel(s)?,
            _ => start.clone(),
        };
        let to = match end.as_fixed() {
            Some(e) if e >= UNBOUNDED => d.clone(),
            Some(e) if e <= -UNBOUNDED => return Some(Dim::fixed(0)),
            Some(e) if e < 0 => rel(e)?,
            _ => end.clone(),
        };
        (from, to)
    } else {
        // Walking backwards: the span is start - end, with end -1 meaning "past the front".
        let from = match start.as_fixed() {
            Some(s) if s >= UNBOUNDED => rel(-1)?,
            Some(s) if s < 0 => rel(s)?,
            _ => start.clone(),
        };
        let to = match end.as_fixed() {
            Some(e) if e <= -UNBOUNDED => Dim::fixed(-1),
            Some(e) if e < 0 => rel(e)?,
            _ => end.clone(),
        };
        (to, from)
    };
    let span = to.checked_sub(&from)?;
    let stride = step.checked_abs()?;
    match span.as_fixed() {
        Some(v) => {
            let len = (v.max(0) as i128 + stride as i128 - 1) / stride as i128;
            let len = match d.as_fixed() {
                Some(dv) => len.min(dv.max(0) as i128),
                None => len,
            };
            Some(Dim::fixed(len as i64))
        }
        None => span.checked_div_exact(&Dim::fixed(stride)),
    }
}

fn expand(cx: &Cx) -> Result<Shape> {
    if let Some(r) = cx.rank(1).filter(|&r| r != 1) {
        return Err(cx.err(format!("the shape input must be 1-D, got rank {r}")));
    }
    match (cx.shape(0), cx.value(1)) {
        (Some(x), Some(target)) => broadcast(cx, &[x, target]).map(Some),
        (x, None) => Ok(cx.list_len(1).zip(x.map(|x| x.len())).map(|(k, r)| cx.fresh_shape(0, k.max(r)))),
        (None, Some(_)) => Ok(None),
    }
}

fn tile(cx: &Cx) -> Result<Shape> {
    if let Some(r) = cx.rank(1).filter(|&r| r != 1) {
        return Err(cx.err(format!("the repeats input must be 1-D, got rank {r}")));
    }
    let Some(x) = cx.shape(0) else { return Ok(None) };
    let Some(reps) = cx.value(1) else { return Ok(Some(cx.fresh_shape(0, x.len()))) };
    if reps.len() != x.len() {
        return Err(cx.err(format!("{} repeats for rank {}", reps.len(), x.len())));
    }
    Ok(Some(
        x.iter().zip(reps).enumerate().map(|(i, (d, r))| d.checked_mul(r).unwrap_or_else(|| cx.fresh(0, i))).collect(),
    ))
}

/// Shape's start/end, resolved and clamped to `0..=rank` (ONNX 15).
fn shape_range(start: i64, end: Option<i64>, rank: usize) -> (usize, usize) {
    let r = rank as i64;
    let norm = |v: i64| (if v < 0 { v.saturating_add(r) } else { v }).clamp(0, r) as usize;
    let s = norm(start);
    let e = end.map_or(rank, norm);
    (s, e.max(s))
}

fn constant_of_shape(cx: &Cx) -> Result<Shape> {
    cx.check_list(0, "shape")?;
    let Some(v) = cx.value(0) else { return Ok(cx.list_len(0).map(|k| cx.fresh_shape(0, k))) };
    if let Some(d) = v.iter().find_map(|d| d.as_fixed().filter(|&x| x < 0)) {
        return Err(cx.err(format!("negative dim {d} in the shape")));
    }
    Ok(Some(v.to_vec()))
}

/// A Range argument: a tracked integer value, or a constant of any type.
fn range_arg(cx: &Cx, i: usize) -> Option<RangeArg> {
    if let Some([d]) = cx.value(i) {
        return Some(match d.as_fixed() {
            Some(v) => RangeArg::Num(v as f64),
            None => RangeArg::Sym(d.clone()),
        });
    }
    let c = cx.g.const_of(cx.input(i)?)?;
    let t = c.to_tensor();
    (t.len() == 1).then(|| RangeArg::Num(t.data.get_f64(0)))
}

enum RangeArg {
    Num(f64),
    Sym(Dim),
}

fn range_len(cx: &Cx) -> Result<Dim> {
    for i in 0..3 {
        if let Some(r) = cx.rank(i).filter(|&r| r > 1) {
            return Err(cx.err(format!("input {i} must be a scalar, got rank {r}")));
        }
    }
    let args = (range_arg(cx, 0), range_arg(cx, 1), range_arg(cx, 2));
    let len = match args {
        (Some(RangeArg::Num(s)), Some(RangeArg::Num(l)), Some(RangeArg::Num(d))) => {
            if d == 0.0 {
                return Err(cx.err("delta is 0"));
            }
            let n = ((l - s) / d).ceil().max(0.0);
            (n.is_finite() && n < i64::MAX as f64).then_some(Dim::fixed(n as i64))
        }
        // Integer ranges with a symbolic bound: (limit - start) / delta when exact.
        (Some(start), Some(limit), Some(RangeArg::Num(d))) if d.fract() == 0.0 && d >= 1.0 => {
            let as_dim = |a: RangeArg| match a {
                RangeArg::Num(v) if v.fract() == 0.0 && v.abs() < i64::MAX as f64 => Some(Dim::fixed(v as i64)),
                RangeArg::Num(_) => None,
                RangeArg::Sym(d) => Some(d),
            };
            as_dim(limit)
                .zip(as_dim(start))
                .and_then(|(l, s)| l.checked_sub(&s))
                .and_then(|span| span.checked_div_exact(&Dim::fixed(d as i64)))
        }
        _ => None,
    };
    Ok(len.unwrap_or_else(|| cx.fresh(0, 0)))
}

fn gather(cx: &Cx, axis: i64) -> Result<Shape> {
    let (Some(data), Some(idx)) = (cx.shape(0), cx.shape(1)) else {
        if let Some(r) = cx.rank(0) {
            cx.axis(axis, r)?;
        }
        return Ok(None);
    };
    let a = cx.axis(axis, data.len())?;
    Ok(Some(data[..a].iter().chain(idx).chain(&data[a + 1..]).cloned().collect()))
}

fn gather_nd(cx: &Cx, batch_dims: i64) -> Result<Shape> {
    let (Some(data), Some(idx)) = (cx.shape(0), cx.shape(1)) else { return Ok(None) };
    let Some(last) = idx.last() else { return Err(cx.err("indices must have rank >= 1")) };
    let Some(k) = last.as_fixed() else { return Ok(None) }; // the rank depends on it
    let b = usize::try_from(batch_dims).map_err(|_| cx.err(format!("invalid batch_dims {batch_dims}")))?;
    let tail = usize::try_from(k).ok().and_then(|k| k.checked_add(b)).filter(|&t| t <= data.len() && b < idx.len());
    let Some(tail) = tail else {
        return Err(cx.err(format!("indices of depth {k} with batch_dims {b} do not fit data of rank {}", data.len())));
    };
    Ok(Some(idx[..idx.len() - 1].iter().chain(&data[tail..]).cloned().collect()))
}

/// The output value (slot 0) when it is a small integer tensor we can follow.
fn track_value(cx: &Cx, out: &TensorType) -> Option<Vec<Dim>> {
    if !out.dtype.is_int() || out.rank().is_none_or(|r| r > 1) {
        return None;
    }
    let v = match &cx.node.op {
        Op::Const { id } => {
            let c = cx.g.consts.get(*id)?;
            if c.shape.len() > 1 || c.numel() > MAX_TRACKED {
                return None;
            }
            fixed_dims(&c.to_tensor().to_i64_vec().ok()?)
        }
        Op::Shape { start, end } => {
            let s = cx.shape(0)?;
            let (a, b) = shape_range(*start, *end, s.len());
            s[a..b].to_vec()
        }
        Op::Size => vec![product(cx.shape(0)?)?],
        Op::Identity | Op::Cast { .. } | Op::CastLike | Op::Reshape { .. } | Op::Squeeze | Op::Unsqueeze => {
            cx.value(0)?.to_vec()
        }
        Op::Gather { .. } => {
            let data = cx.value(0)?;
            take(data, &cx.fixed_value(1)?)?
        }
        Op::Slice => slice_value(cx)?,
        Op::Concat { .. } => {
            let mut all = Vec::new();
            for i in (0..cx.ins.len()).filter(|&i| cx.has(i)) {
                all.extend_from_slice(cx.value(i)?);
            }
            all
        }
        Op::Binary(b) => {
            let f: fn(&Dim, &Dim) -> Option<Dim> = match b {
                BinaryOp::Add => |a, b| a.checked_add(b),
                BinaryOp::Sub => |a, b| a.checked_sub(b),
                BinaryOp::Mul => |a, b| a.checked_mul(b),
                BinaryOp::Div => |a, b| a.checked_div_exact(b),
                _ => return None,
            };
            zip_values(cx.value(0)?, cx.value(1)?, f)?
        }
        Op::Variadic(op @ (VariadicOp::Max | VariadicOp::Min)) => {
            let mut acc = cx.fixed_value(0)?;
            for i in (1..cx.ins.len()).filter(|&i| cx.has(i)) {
                let next = fixed_dims(&cx.fixed_value(i)?);
                let pick = |a: &Dim, b: &Dim| {
                    let (x, y) = (a.as_fixed()?, b.as_fixed()?);
                    Some(Dim::fixed(if *op == VariadicOp::Max { x.max(y) } else { x.min(y) }))
                };
                acc = all_fixed(&zip_values(&fixed_dims(&acc), &next, pick)?)?;
            }
            fixed_dims(&acc)
        }
        Op::ConstantOfShape { value } => {
            let n = fixed_numel(out.shape.as_deref()?)?;
            let v = value.to_i64_vec().ok()?;
            if !(0..=MAX_TRACKED as i128).contains(&n) || v.len() != 1 {
                return None;
            }
            vec![Dim::fixed(v[0]); n as usize]
        }
        Op::Range => {
            // The inferred length already accounts for the limit.
            let n = out.shape.as_deref()?.first()?.as_fixed()?;
            let (s, d) = (cx.fixed_value(0)?, cx.fixed_value(2)?);
            let (&[s], &[d]) = (&s[..], &d[..]) else { return None };
            if !(0..=MAX_TRACKED as i64).contains(&n) {
                return None;
            }
            (0..n).map(|k| d.checked_mul(k)?.checked_add(s).map(Dim::fixed)).collect::<Option<Vec<_>>>()?
        }
        _ => return None,
    };
    // The value must agree with the inferred type: one element for a scalar, a
    // matching length for a fixed 1-D type.
    let fits = match out.shape.as_deref()? {
        [] => v.len() == 1,
        [d] => d.as_fixed().is_none_or(|n| n == v.len() as i64),
        _ => false,
    };
    (fits && v.len() <= MAX_TRACKED).then_some(v)
}

/// Elementwise op on two tracked values, broadcasting length-1 operands.
fn zip_values(a: &[Dim], b: &[Dim], f: impl Fn(&Dim, &Dim) -> Option<Dim>) -> Option<Vec<Dim>> {
    let n = a.len().max(b.len());
    if (a.len() != n && a.len() != 1) || (b.len() != n && b.len() != 1) {
        return None;
    }
    let at = |v: &[Dim], i: usize| if v.len() == 1 { 0 } else { i };
    (0..n).map(|i| f(&a[at(a, i)], &b[at(b, i)])).collect()
}

/// `data[indices]` for a 1-D tracked value, negative indices counting from the end.
fn take(data: &[Dim], indices: &[i64]) -> Option<Vec<Dim>> {
    let n = data.len() as i64;
    indices
        .iter()
        .map(|&i| {
            let i = if i < 0 { i.checked_add(n)? } else { i };
            data.get(usize::try_from(i).ok()?).cloned()
        })
        .collect()
}

/// Slice of a 1-D tracked value with fixed bounds.
fn slice_value(cx: &Cx) -> Option<Vec<Dim>> {
    let data = cx.value(0)?;
    let (starts, ends) = (cx.fixed_value(1)?, cx.fixed_value(2)?);
    let axes = if cx.has(3) { cx.fixed_value(3)? } else { vec![0] };
    let steps = if cx.has(4) { cx.fixed_value(4)? } else { vec![1] };
    let (&[s], &[e], &[a], &[st]) = (&starts[..], &ends[..], &axes[..], &steps[..]) else { return None };
    if !(a == 0 || a == -1) || st == 0 || data.is_empty() {
        return None;
    }
    let (s, e) = clamp_bounds(data.len() as i128, s as i128, e as i128, st as i128);
    let mut out = Vec::new();
    let mut i = s;
    while (st > 0 && i < e) || (st < 0 && i > e) {
        out.push(data.get(usize::try_from(i).ok()?)?.clone());
        i += st as i128;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Tensor, Value};

    fn sym_type(dtype: DType, dims: &[&str]) -> TensorType {
        TensorType::new(
            dtype,
            dims.iter().map(|d| d.parse::<i64>().map(Dim::fixed).unwrap_or_else(|_| Dim::sym(d))).collect(),
        )
    }

    fn input(g: &mut Graph, name: &str, ty: TensorType) -> ValueRef {
        let index = g.inputs.len();
        let n = g.add_node(Op::Input { index }, name.into(), &[], vec![Value { name: name.into(), ty }]);
        g.inputs.push(n);
        ValueRef { node: n, slot: 0 }
    }

    fn op(g: &mut Graph, op: Op, name: &str, ins: &[ValueRef]) -> ValueRef {
        let ins: Vec<Option<ValueRef>> = ins.iter().copied().map(Some).collect();
        let out = Value { name: name.into(), ty: TensorType { dtype: DType::F32, shape: None } };
        let n = g.add_node(op, name.into(), &ins, vec![out]);
        ValueRef { node: n, slot: 0 }
    }

    fn ints(g: &mut Graph, name: &str, v: &[i64]) -> ValueRef {
        g.add_const(name.into(), &Tensor::from_vec(vec![v.len()], v.to_vec()))
    }

    fn scalar(g: &mut Graph, name: &str, v: i64) -> ValueRef {
        g.add_const(name.into(), &Tensor::scalar(v))
    }

    fn ty_str(g: &Graph, v: ValueRef) -> String {
        crate::ir::text::type_str(g.ty(v))
    }

    /// `Shape(x)[i]` as a 1-element vector, the way exporters build shape lists.
    fn dim_of(g: &mut Graph, x: ValueRef, i: i64, tag: &str) -> ValueRef {
        let shape = op(g, Op::Shape { start: 0, end: None }, &format!("shape_{tag}"), &[x]);
        let idx = scalar(g, &format!("idx_{tag}"), i);
        let d = op(g, Op::Gather { axis: 0 }, &format!("gather_{tag}"), &[shape, idx]);
        let axes = ints(g, &format!("axes_{tag}"), &[0]);
        op(g, Op::Unsqueeze, &format!("unsq_{tag}"), &[d, axes])
    }

    #[test]
    fn exporter_reshape_pattern() {
        let mut g = Graph::new("t", 17);
        let x = input(&mut g, "x", sym_type(DType::F32, &["batch", "seq", "64"]));
        let b = dim_of(&mut g, x, 0, "b");
        let s = dim_of(&mut g, x, 1, "s");
        let heads = ints(&mut g, "heads", &[4, 16]);
        let target = op(&mut g, Op::Concat { axis: 0 }, "concat", &[b, s, heads]);
        let y = op(&mut g, Op::Reshape { allowzero: false }, "reshape", &[x, target]);
        let inf = infer(&mut g).unwrap();
        assert_eq!(ty_str(&g, y), "f32[batch,seq,4,16]");
        assert_eq!(ty_str(&g, target), "i64[4]");
        assert_eq!(inf.values[&target], vec![Dim::sym("batch"), Dim::sym("seq"), Dim::fixed(4), Dim::fixed(16)]);
    }

    #[test]
    fn reshape_minus_one_round_trip() {
        let mut g = Graph::new("t", 17);
        let x = input(&mut g, "x", sym_type(DType::F32, &["batch", "seq", "64"]));
        let flat = ints(&mut g, "flat", &[-1, 64]);
        let y = op(&mut g, Op::Reshape { allowzero: false }, "flatten", &[x, flat]);
        let back = ints(&mut g, "back", &[-1, 0, 4, 16]);
        let s = dim_of(&mut g, x, 1, "s");
        let m1 = ints(&mut g, "m1", &[-1]);
        let t2 = ints(&mut g, "t2", &[64]);
        let target = op(&mut g, Op::Concat { axis: 0 }, "target", &[m1, s, t2]);
        let z = op(&mut g, Op::Reshape { allowzero: false }, "unflatten", &[y, target]);
        let w = op(&mut g, Op::Reshape { allowzero: false }, "split_heads", &[z, back]);
        infer(&mut g).unwrap();
        assert_eq!(ty_str(&g, y), "f32[batch*seq,64]");
        assert_eq!(ty_str(&g, z), "f32[batch,seq,64]");
        assert_eq!(ty_str(&g, w), "f32[batch,seq,4,16]");
    }

    #[test]
    fn concat_adds_symbolic_dims() {
        let mut g = Graph::new("t", 17);
        let past = input(&mut g, "past", sym_type(DType::F32, &["b", "past", "16"]));
        let cur = input(&mut g, "cur", sym_type(DType::F32, &["b", "seq", "16"]));
        let kv = op(&mut g, Op::Concat { axis: 1 }, "kv", &[past, cur]);
        let kv2 = op(&mut g, Op::Concat { axis: -2 }, "kv2", &[cur, past]);
        infer(&mut g).unwrap();
        assert_eq!(ty_str(&g, kv), "f32[b,past+seq,16]");
        assert_eq!(g.ty(kv), g.ty(kv2));
    }

    #[test]
    fn matmul_inner_mismatch_names_the_node() {
        let mut g = Graph::new("t", 17);
        let a = input(&mut g, "a", sym_type(DType::F32, &["batch", "8", "64"]));
        let w = g.add_const("w".into(), &Tensor::zeros(DType::F32, vec![32, 16]));
        op(&mut g, Op::MatMul, "proj_q", &[a, w]);
        let e = infer(&mut g).unwrap_err().to_string();
        assert!(e.contains("proj_q") && e.contains("64") && e.contains("32"), "{e}");
    }

    #[test]
    fn matmul_shapes() {
        let mut g = Graph::new("t", 17);
        let a = input(&mut g, "a", sym_type(DType::F32, &["batch", "seq", "64"]));
        let w = g.add_const("w".into(), &Tensor::zeros(DType::F32, vec![64, 16]));
        let v = g.add_const("v".into(), &Tensor::zeros(DType::F32, vec![64]));
        let y = op(&mut g, Op::MatMul, "y", &[a, w]);
        let z = op(&mut g, Op::MatMul, "z", &[a, v]);
        infer(&mut g).unwrap();
        assert_eq!(ty_str(&g, y), "f32[batch,seq,16]");
        assert_eq!(ty_str(&g, z), "f32[batch,seq]");
    }

    #[test]
    fn slice_with_symbolic_end() {
        let mut g = Graph::new("t", 17);
        let x = input(&mut g, "x", sym_type(DType::F32, &["batch", "seq", "64"]));
        let table = g.add_const("pos".into(), &Tensor::zeros(DType::F32, vec![2048, 64]));
        let end = dim_of(&mut g, x, 1, "s");
        let zero = ints(&mut g, "zero", &[0]);
        let pos = op(&mut g, Op::Slice, "pos_slice", &[table, zero, end, zero]);
        // x[:, -1:] and x[:, 1:INT64_MAX]
        let m1 = ints(&mut g, "m1", &[-1]);
        let big = ints(&mut g, "big", &[i64::MAX]);
        let one = ints(&mut g, "one", &[1]);
        let last = op(&mut g, Op::Slice, "last", &[x, m1, big, one]);
        let tail = op(&mut g, Op::Slice, "tail", &[x, one, big, one]);
        infer(&mut g).unwrap();
        assert_eq!(ty_str(&g, pos), "f32[seq,64]");
        assert_eq!(ty_str(&g, last), "f32[batch,1,64]");
        assert_eq!(ty_str(&g, tail), "f32[batch,seq-1,64]");
    }

    #[test]
    fn range_from_shape() {
        let mut g = Graph::new("t", 17);
        let x = input(&mut g, "x", sym_type(DType::I64, &["batch", "seq"]));
        let shape = op(&mut g, Op::Shape { start: 0, end: None }, "shape", &[x]);
        let one = scalar(&mut g, "one", 1);
        let seq = op(&mut g, Op::Gather { axis: 0 }, "seq", &[shape, one]);
        let zero = scalar(&mut g, "zero", 0);
        let r = op(&mut g, Op::Range, "range", &[zero, seq, one]);
        let fixed = {
            let five = scalar(&mut g, "five", 5);
            op(&mut g, Op::Range, "range5", &[zero, five, one])
        };
        let inf = infer(&mut g).unwrap();
        assert_eq!(ty_str(&g, r), "i64[seq]");
        assert_eq!(ty_str(&g, fixed), "i64[5]");
        assert_eq!(inf.values[&fixed], fixed_dims(&[0, 1, 2, 3, 4]));
    }

    #[test]
    fn broadcast_and_errors() {
        let mut g = Graph::new("t", 17);
        let a = input(&mut g, "a", sym_type(DType::F32, &["batch", "1", "seq"]));
        let b = input(&mut g, "b", sym_type(DType::F32, &["4", "seq"]));
        let y = op(&mut g, Op::Binary(BinaryOp::Add), "add", &[a, b]);
        let c = op(&mut g, Op::Binary(BinaryOp::Less), "less", &[a, b]);
        infer(&mut g).unwrap();
        assert_eq!(ty_str(&g, y), "f32[batch,4,seq]");
        assert_eq!(ty_str(&g, c), "bool[batch,4,seq]");

        let mut g = Graph::new("t", 17);
        let a = input(&mut g, "a", sym_type(DType::F32, &["3"]));
        let b = input(&mut g, "b", sym_type(DType::F32, &["4"]));
        op(&mut g, Op::Binary(BinaryOp::Mul), "bad_mul", &[a, b]);
        assert!(infer(&mut g).unwrap_err().to_string().contains("bad_mul"));
    }

    #[test]
    fn unknown_dims_get_stable_names_and_declared_shapes_win() {
        let mut g = Graph::new("t", 17);
        let x = input(&mut g, "x", sym_type(DType::F32, &["n", "8"]));
        let shape = input(&mut g, "shape", sym_type(DType::I64, &["2"]));
        let y = op(&mut g, Op::Reshape { allowzero: false }, "r", &[x, shape]);
        let z = op(&mut g, Op::Reshape { allowzero: false }, "r2", &[x, shape]);
        g.g[z.node].outputs[0].ty = sym_type(DType::F32, &["rows", "cols"]);
        infer(&mut g).unwrap();
        assert_eq!(ty_str(&g, y), "f32[d2_0,d2_1]");
        assert_eq!(ty_str(&g, z), "f32[rows,cols]");
        // A second run gives the same answer.
        infer(&mut g).unwrap();
        assert_eq!(ty_str(&g, y), "f32[d2_0,d2_1]");
    }

    #[test]
    fn split_reduce_transpose_gather() {
        let mut g = Graph::new("t", 18);
        let x = input(&mut g, "x", sym_type(DType::F32, &["batch", "seq", "192"]));
        let outs: Vec<Value> = (0..3)
            .map(|i| Value { name: format!("qkv{i}"), ty: TensorType { dtype: DType::F32, shape: None } })
            .collect();
        let n = g.add_node(Op::Split { axis: 2, num_outputs: Some(3) }, "split".into(), &[Some(x)], outs);
        let red = op(
            &mut g,
            Op::Reduce {
                kind: crate::ir::ReduceKind::Mean,
                axes: Some(vec![-1]),
                keepdims: true,
                noop_with_empty_axes: false,
            },
            "mean",
            &[x],
        );
        let tr = op(&mut g, Op::Transpose { perm: Some(vec![1, 0, 2]) }, "tr", &[x]);
        let idx = input(&mut g, "ids", sym_type(DType::I64, &["batch", "seq"]));
        let emb = g.add_const("emb".into(), &Tensor::zeros(DType::F32, vec![100, 32]));
        let ge = op(&mut g, Op::Gather { axis: 0 }, "embed", &[emb, idx]);
        infer(&mut g).unwrap();
        for slot in 0..3 {
            assert_eq!(ty_str(&g, ValueRef { node: n, slot }), "f32[batch,seq,64]");
        }
        assert_eq!(ty_str(&g, red), "f32[batch,seq,1]");
        assert_eq!(ty_str(&g, tr), "f32[seq,batch,192]");
        assert_eq!(ty_str(&g, ge), "f32[batch,seq,32]");
    }

    #[test]
    fn extreme_inputs_do_not_panic() {
        let mut g = Graph::new("t", 17);
        let x = input(&mut g, "x", sym_type(DType::F32, &["seq", "0", "5"]));
        let lo = ints(&mut g, "lo", &[i64::MIN, i64::MIN, i64::MAX]);
        let hi = ints(&mut g, "hi", &[i64::MAX, i64::MAX, i64::MIN]);
        let axes = ints(&mut g, "axes", &[0, 1, 2]);
        let steps = ints(&mut g, "steps", &[i64::MIN, 1, i64::MIN]);
        let sl = op(&mut g, Op::Slice, "sl", &[x, lo, hi, axes, steps]);
        let big = ints(&mut g, "big", &[i64::MAX, i64::MAX]);
        let sum = op(&mut g, Op::Binary(BinaryOp::Mul), "mul", &[big, big]);
        let add = op(&mut g, Op::Binary(BinaryOp::Add), "add", &[big, big]);
        let neg = ints(&mut g, "neg", &[i64::MIN]);
        let m1 = ints(&mut g, "m1", &[-1]);
        let div = op(&mut g, Op::Binary(BinaryOp::Div), "div", &[neg, m1]);
        let r = {
            let (a, b, c) = (scalar(&mut g, "a", i64::MIN), scalar(&mut g, "b", i64::MAX), scalar(&mut g, "c", 1));
            op(&mut g, Op::Range, "range", &[a, b, c])
        };
        let cos = op(&mut g, Op::ConstantOfShape { value: Tensor::scalar(1i64) }, "cos", &[neg]);
        let sq = op(&mut g, Op::Squeeze, "sq", &[x]);
        let result = infer(&mut g);
        // A negative ConstantOfShape dim is a definite error; everything before it must not panic.
        assert!(result.unwrap_err().to_string().contains("cos"));
        let _ = (sl, sum, add, div, r, cos, sq);
    }

    #[test]
    fn fixed_reshape_mismatch_errors() {
        let mut g = Graph::new("t", 17);
        let x = input(&mut g, "x", sym_type(DType::F32, &["2", "3"]));
        let t = ints(&mut g, "t", &[4, 2]);
        op(&mut g, Op::Reshape { allowzero: false }, "bad_reshape", &[x, t]);
        assert!(infer(&mut g).unwrap_err().to_string().contains("bad_reshape"));
    }
}

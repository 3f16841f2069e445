//! Lowering: each IR node becomes a short list of kernels (map, row, matmul, gather, values).
//! Data movement ops become views, so they cost one copy at most (and none when the planner
//! aliases them).

use std::collections::HashMap;

use super::attention::AttentionKernel;
use super::emit::Loc;
use super::gather::GatherKernel;
use super::map::{dense_strides, Expr, MapKernel, View};
use super::matmul::{MatMulKernel, Operand};
use super::reduce::Rows;
use crate::error::{Error, Result};
use crate::ir::{BinaryOp, DType, Dim, Graph, Node, Op, ReduceKind, UnaryOp, ValueRef, VariadicOp};
use crate::passes::shape_infer::{slice_start, Inferred, UNBOUNDED};
use petgraph::stable_graph::NodeIndex;

#[derive(Clone, Debug)]
pub enum Kernel {
    Map(Box<MapKernel>),
    Reduce(Rows, ReduceKind),
    Softmax(Rows, bool),
    LayerNorm {
        rows: Rows,
        eps: f32,
        has_bias: bool,
        stats: (Option<usize>, Option<usize>),
    },
    ArgReduce {
        rows: Rows,
        max: bool,
        last: bool,
    },
    CumSum {
        rows: Rows,
        exclusive: bool,
        reverse: bool,
    },
    MatMul(Box<MatMulKernel>),
    /// Rows of A rounded to int8 per block into scratch (MatMulNBits accuracy_level 4, or with a
    /// static activation scale).
    QuantizeRows {
        a: Loc,
        rows: Dim,
        scratch: Loc,
        pk: super::layout::NBitsPacking,
    },
    Gather(Box<GatherKernel>),
    RmsNorm {
        rows: Rows,
        eps: f32,
    },
    Attention(Box<AttentionKernel>),
    /// Runs the kernel only when the caller passed a buffer at `loc` (an input or output
    /// pointer that may be null: the KV cache's past and present in stateful runs).
    IfBuffer(Loc, Box<Kernel>),
    /// Known element values (symbolic dims evaluated at run time), stored densely.
    Values {
        loc: Loc,
        dtype: DType,
        values: Vec<Dim>,
    },
}

impl Kernel {
    /// Every buffer location the kernel reads or writes (for `emit::parameterise`).
    pub fn locs_mut(&mut self) -> Vec<&mut Loc> {
        match self {
            Kernel::Map(m) => std::iter::once(&mut m.out.loc).chain(m.inputs.iter_mut().map(|v| &mut v.loc)).collect(),
            Kernel::Reduce(rows, _)
            | Kernel::Softmax(rows, _)
            | Kernel::LayerNorm { rows, .. }
            | Kernel::ArgReduce { rows, .. }
            | Kernel::CumSum { rows, .. }
            | Kernel::RmsNorm { rows, .. } => rows.locs.iter_mut().collect(),
            Kernel::MatMul(mm) => mm.locs_mut(),
            Kernel::QuantizeRows { a, scratch, .. } => vec![a, scratch],
            Kernel::Gather(g) => vec![&mut g.out.loc, &mut g.data.loc, &mut g.indices.loc],
            Kernel::Attention(a) => a.locs_mut(),
            Kernel::IfBuffer(loc, k) => {
                let mut v = vec![loc];
                v.extend(k.locs_mut());
                v
            }
            Kernel::Values { loc, .. } => vec![loc],
        }
    }
}

/// What lowering needs to know about values: where they live and what is known at compile time.
pub struct LowerCx<'a> {
    pub g: &'a Graph,
    pub inferred: &'a Inferred,
    pub locs: &'a HashMap<ValueRef, Loc>,
    /// Per node: byte offset of its private scratch in the arena, if it asked for one.
    pub scratch: Option<u64>,
    /// Matmul weights stored in column panels (`plan::pack_panels`).
    pub packed: &'a std::collections::HashSet<ValueRef>,
    /// Pruned matmul weights stored block-sparse (`layout::SparseWeight`).
    pub sparse: &'a HashMap<ValueRef, super::layout::SparseWeight>,
    /// Quantized matmul weights in packed form (`layout::NBitsPacking`).
    pub nbits: &'a HashMap<ValueRef, super::layout::NBitsPacking>,
    /// KV-cache Concats and their arena regions (`kv_cache`).
    pub kv: &'a HashMap<NodeIndex, super::kv_cache::KvSlot>,
    /// Run-time conditions the kernels rely on (dim >= min, and the node), for the META section.
    pub requires: &'a std::cell::RefCell<Vec<(Dim, u64, String)>>,
}

/// Which inputs a node reads at run time (others only shape the kernel at compile time).
pub fn reads_input(op: &Op, slot: usize) -> bool {
    match op {
        Op::Reshape { .. }
        | Op::Expand
        | Op::Tile
        | Op::Squeeze
        | Op::Unsqueeze
        | Op::Split { .. }
        | Op::Reduce { .. }
        | Op::CumSum { .. }
        | Op::Trilu { .. }
        | Op::Slice
        | Op::Dropout => slot == 0,
        Op::Range => slot != 1,
        Op::ConstantOfShape { .. } | Op::Shape { .. } | Op::Size => false,
        _ => true,
    }
}

/// Arena bytes of private scratch a node needs.
pub fn scratch_bytes(op: &Op) -> u64 {
    match op {
        Op::DynamicQuantizeLinear => 64,
        _ => 0,
    }
}

fn unsupported(node: &Node, why: impl Into<String>) -> Error {
    Error::Node { node: node.name.clone(), op: node.op.name().to_string(), opset: 0, msg: why.into() }
}

impl LowerCx<'_> {
    fn shape(&self, v: ValueRef) -> Vec<Dim> {
        self.g.ty(v).shape.clone().expect("codegen checked every shape is known")
    }
    fn dtype(&self, v: ValueRef) -> DType {
        self.g.ty(v).dtype
    }
    fn loc(&self, v: ValueRef) -> Loc {
        self.locs[&v]
    }
    /// The integer elements of a value known at compile time (constant or tracked by inference).
    fn known(&self, v: ValueRef) -> Option<Vec<Dim>> {
        if let Some(c) = self.g.const_of(v) {
            let t = c.to_tensor();
            if t.dtype().is_int() {
                return Some(t.cast(DType::I64).as_slice::<i64>().ok()?.iter().map(|&x| Dim::fixed(x)).collect());
            }
        }
        self.inferred.values.get(&v).cloned()
    }
    fn known_fixed(&self, v: ValueRef) -> Option<Vec<i64>> {
        self.known(v)?.iter().map(|d| d.as_fixed()).collect()
    }
    /// A one-element float/int constant, to inline as an immediate.
    fn scalar_const(&self, v: ValueRef) -> Option<Expr> {
        let c = self.g.const_of(v)?;
        if c.numel() != 1 {
            return None;
        }
        let t = c.to_tensor();
        let dt = t.dtype();
        Some(if dt.is_float() {
            Expr::F(t.cast(DType::F64).as_slice::<f64>().ok()?[0], dt)
        } else {
            Expr::I(t.cast(DType::I64).as_slice::<i64>().ok()?[0], dt)
        })
    }
    /// A view of `v` broadcast (numpy rules) to `out`.
    fn broadcast_view(&self, v: ValueRef, out: &[Dim]) -> View {
        let shape = self.shape(v);
        let dense = dense_strides(&shape);
        let pad = out.len() - shape.len();
        let strides = (0..out.len())
            .map(|a| {
                if a < pad || (shape[a - pad] == Dim::fixed(1) && out[a] != Dim::fixed(1)) {
                    Dim::fixed(0)
                } else {
                    dense[a - pad].clone()
                }
            })
            .collect();
        View { loc: self.loc(v), dtype: self.dtype(v), offset: Dim::fixed(0), strides }
    }
}

/// Builds an elementwise map over `out` from operand expressions; inputs that are one-element
/// constants become immediates.
struct MapBuilder<'c, 'a> {
    cx: &'c LowerCx<'a>,
    dims: Vec<Dim>,
    inputs: Vec<View>,
}

impl<'c, 'a> MapBuilder<'c, 'a> {
    fn new(cx: &'c LowerCx<'a>, dims: Vec<Dim>) -> Self {
        MapBuilder { cx, dims, inputs: Vec::new() }
    }
    fn operand(&mut self, v: ValueRef) -> Expr {
        if let Some(e) = self.cx.scalar_const(v) {
            return e;
        }
        self.inputs.push(self.cx.broadcast_view(v, &self.dims));
        Expr::In(self.inputs.len() - 1)
    }
    fn view(&mut self, view: View) -> Expr {
        self.inputs.push(view);
        Expr::In(self.inputs.len() - 1)
    }
    fn finish(self, out: View, expr: Expr) -> Kernel {
        Kernel::Map(Box::new(MapKernel { dims: self.dims, out, inputs: self.inputs, expr }))
    }
}

fn norm_axis(axis: i64, rank: usize) -> usize {
    if axis < 0 {
        (axis + rank as i64) as usize
    } else {
        axis as usize
    }
}

pub fn lower_node(cx: &LowerCx, n: NodeIndex) -> Result<Vec<Kernel>> {
    let g = cx.g;
    let node = g.node(n);
    let ins = g.inputs_of(n);
    let input = |i: usize| ins.get(i).copied().flatten();
    let out_ref = |slot: usize| ValueRef { node: n, slot };
    let out0 = out_ref(0);
    let oshape = cx.shape(out0);
    let odt = cx.dtype(out0);
    let out_view = |slot: usize| {
        let v = out_ref(slot);
        View::dense(cx.loc(v), cx.dtype(v), &cx.shape(v))
    };
    let mut mb = MapBuilder::new(cx, oshape.clone());
    let k = match &node.op {
        Op::Unary(u) => {
            let x = mb.operand(input(0).unwrap());
            mb.finish(out_view(0), Expr::un(u.clone(), x))
        }
        Op::Binary(BinaryOp::Pow) => {
            let base = mb.operand(input(0).unwrap());
            let e = match cx.scalar_const(input(1).unwrap()) {
                Some(Expr::F(p, _)) if odt.is_float() => pow_by_const(base, p, odt),
                _ => {
                    let ex = mb.operand(input(1).unwrap());
                    // Mixed-type Pow (float base, int exponent) computes in the base's type.
                    let edt = cx.dtype(input(1).unwrap());
                    let ex = if edt != odt { Expr::Cast(Box::new(ex), odt) } else { ex };
                    Expr::bin(BinaryOp::Pow, base, ex)
                }
            };
            mb.finish(out_view(0), e)
        }
        Op::Binary(b) => {
            let x = mb.operand(input(0).unwrap());
            let y = mb.operand(input(1).unwrap());
            mb.finish(out_view(0), Expr::bin(*b, x, y))
        }
        Op::Elementwise { steps } => {
            // The whole tree as one expression: one loop, intermediates in registers.
            let mut ins_e = Vec::with_capacity(node.num_inputs);
            for i in 0..node.num_inputs {
                ins_e.push(mb.operand(input(i).ok_or_else(|| unsupported(node, "missing input"))?));
            }
            let mut es: Vec<Expr> = Vec::with_capacity(steps.len());
            for st in steps {
                let a = |k: usize| match st.args.get(k) {
                    Some(crate::ir::ElemArg::In(i)) => ins_e.get(*i).cloned(),
                    Some(crate::ir::ElemArg::Step(j)) => es.get(*j).cloned(),
                    None => None,
                };
                let e = match &st.op {
                    Op::Unary(u) => a(0).map(|x| Expr::un(u.clone(), x)),
                    Op::Binary(b) => a(0).zip(a(1)).map(|(x, y)| Expr::bin(*b, x, y)),
                    _ => None,
                };
                es.push(e.ok_or_else(|| unsupported(node, "malformed elementwise step"))?);
            }
            let e = es.pop().ok_or_else(|| unsupported(node, "no steps"))?;
            mb.finish(out_view(0), e)
        }
        Op::Variadic(v) => {
            let mut it = (0..node.num_inputs).filter_map(input);
            let first = mb.operand(it.next().ok_or_else(|| unsupported(node, "no inputs"))?);
            let mut e = first;
            for x in it {
                let y = mb.operand(x);
                e = match v {
                    VariadicOp::Min => Expr::Min(Box::new(e), Box::new(y)),
                    VariadicOp::Max => Expr::Max(Box::new(e), Box::new(y)),
                    VariadicOp::Sum | VariadicOp::Mean => Expr::bin(BinaryOp::Add, e, y),
                };
            }
            if *v == VariadicOp::Mean {
                let k = node.num_inputs as f64;
                let c = if odt.is_float() { Expr::F(k, odt) } else { Expr::I(k as i64, odt) };
                e = Expr::bin(BinaryOp::Div, e, c);
            }
            mb.finish(out_view(0), e)
        }
        Op::Where => {
            let c = mb.operand(input(0).unwrap());
            let a = mb.operand(input(1).unwrap());
            let b = mb.operand(input(2).unwrap());
            mb.finish(out_view(0), Expr::Select(Box::new(c), Box::new(a), Box::new(b)))
        }
        Op::Clip => {
            let mut e = mb.operand(input(0).unwrap());
            if let Some(lo) = input(1) {
                let lo = mb.operand(lo);
                e = Expr::Max(Box::new(e), Box::new(lo));
            }
            if let Some(hi) = input(2) {
                let hi = mb.operand(hi);
                e = Expr::Min(Box::new(e), Box::new(hi));
            }
            mb.finish(out_view(0), e)
        }
        Op::Cast { .. } | Op::CastLike => {
            let x = mb.operand(input(0).unwrap());
            mb.finish(out_view(0), Expr::Cast(Box::new(x), odt))
        }
        Op::Identity | Op::Reshape { .. } | Op::Flatten { .. } | Op::Squeeze | Op::Unsqueeze | Op::Dropout => {
            let mut ks = Vec::new();
            // Same element order: read the input densely with the output's shape.
            let src = input(0).unwrap();
            let v = View::dense(cx.loc(src), cx.dtype(src), &oshape);
            let e = mb.view(v);
            ks.push(mb.finish(out_view(0), e));
            if node.op == Op::Dropout && node.outputs.len() > 1 && cx.locs.contains_key(&out_ref(1)) {
                let mask_shape = cx.shape(out_ref(1));
                let m = MapBuilder::new(cx, mask_shape);
                ks.push(m.finish(out_view(1), Expr::I(1, DType::Bool)));
            }
            return Ok(ks);
        }
        Op::Transpose { perm } => {
            let src = input(0).unwrap();
            let ishape = cx.shape(src);
            let r = ishape.len();
            let perm: Vec<usize> = match perm {
                Some(p) => p.iter().map(|&a| norm_axis(a, r)).collect(),
                None => (0..r).rev().collect(),
            };
            let dense = dense_strides(&ishape);
            let strides = perm.iter().map(|&p| dense[p].clone()).collect();
            let e = mb.view(View { loc: cx.loc(src), dtype: cx.dtype(src), offset: Dim::fixed(0), strides });
            mb.finish(out_view(0), e)
        }
        Op::Expand => {
            let x = mb.operand(input(0).unwrap());
            mb.finish(out_view(0), x)
        }
        Op::Slice => {
            let src = input(0).unwrap();
            let ishape = cx.shape(src);
            let r = ishape.len();
            let need = |i: usize, what: &str| {
                cx.known(input(i).unwrap())
                    .ok_or_else(|| unsupported(node, format!("{what} not known at compile time")))
            };
            let starts = need(1, "starts")?;
            let axes: Vec<usize> = match input(3) {
                Some(a) => cx
                    .known_fixed(a)
                    .ok_or_else(|| unsupported(node, "axes not known at compile time"))?
                    .iter()
                    .map(|&a| norm_axis(a, r))
                    .collect(),
                None => (0..starts.len()).collect(),
            };
            let steps: Vec<i64> = match input(4) {
                Some(s) => cx.known_fixed(s).ok_or_else(|| unsupported(node, "steps not known at compile time"))?,
                None => vec![1; axes.len()],
            };
            let dense = dense_strides(&ishape);
            let mut strides = dense.clone();
            let mut offset = Dim::fixed(0);
            for (k, &a) in axes.iter().enumerate() {
                // From the end of a symbolic axis (`x[:, -1:]`): the start is `d - s`, which needs
                // d >= s to stay inside the buffer; the runtime checks it before each run.
                if let (Some(st), false) = (starts[k].as_fixed(), ishape[a].is_fixed()) {
                    if st < 0 && st > -UNBOUNDED && steps[k] > 0 {
                        let what = format!("Slice `{}` (from the end of axis {a})", node.name);
                        cx.requires.borrow_mut().push((ishape[a].clone(), st.unsigned_abs(), what));
                    }
                }
                let s = slice_start(&ishape[a], &starts[k], steps[k])
                    .ok_or_else(|| unsupported(node, "slice start overflows"))?;
                offset = offset.checked_add(&s.checked_mul(&dense[a]).unwrap()).unwrap();
                strides[a] = dense[a].checked_mul(&Dim::fixed(steps[k])).unwrap();
            }
            let e = mb.view(View { loc: cx.loc(src), dtype: cx.dtype(src), offset, strides });
            mb.finish(out_view(0), e)
        }
        Op::Tile => {
            let src = input(0).unwrap();
            let ishape = cx.shape(src);
            let idense = dense_strides(&ishape);
            let odense = dense_strides(&oshape);
            let (mut dims, mut os, mut is) = (Vec::new(), Vec::new(), Vec::new());
            for a in 0..ishape.len() {
                let reps = oshape[a].checked_div_exact(&ishape[a]).unwrap_or_else(|| Dim::fixed(1));
                dims.extend([reps, ishape[a].clone()]);
                os.extend([ishape[a].checked_mul(&odense[a]).unwrap(), odense[a].clone()]);
                is.extend([Dim::fixed(0), idense[a].clone()]);
            }
            let inv = View { loc: cx.loc(src), dtype: cx.dtype(src), offset: Dim::fixed(0), strides: is };
            let ov = View { loc: cx.loc(out0), dtype: odt, offset: Dim::fixed(0), strides: os };
            Kernel::Map(Box::new(MapKernel { dims, out: ov, inputs: vec![inv], expr: Expr::In(0) }))
        }
        Op::Concat { .. } if cx.kv.contains_key(&n) => return Ok(lower_kv_append(cx, &cx.kv[&n], &ins, out0)),
        Op::Concat { axis } => {
            let a = norm_axis(*axis, oshape.len());
            let odense = dense_strides(&oshape);
            let mut at = Dim::fixed(0);
            let mut ks = Vec::new();
            for i in 0..node.num_inputs {
                let Some(src) = input(i) else { continue };
                let ishape = cx.shape(src);
                let ov = View {
                    loc: cx.loc(out0),
                    dtype: odt,
                    offset: at.checked_mul(&odense[a]).unwrap(),
                    strides: odense.clone(),
                };
                let inv = View::dense(cx.loc(src), cx.dtype(src), &ishape);
                at = at.checked_add(&ishape[a]).unwrap();
                ks.push(Kernel::Map(Box::new(MapKernel {
                    dims: ishape,
                    out: ov,
                    inputs: vec![inv],
                    expr: Expr::In(0),
                })));
            }
            return Ok(ks);
        }
        Op::Split { axis, .. } => {
            let src = input(0).unwrap();
            let ishape = cx.shape(src);
            let a = norm_axis(*axis, ishape.len());
            let idense = dense_strides(&ishape);
            let mut at = Dim::fixed(0);
            let mut ks = Vec::new();
            for slot in 0..node.outputs.len() {
                let v = out_ref(slot);
                let shape = cx.shape(v);
                if cx.locs.contains_key(&v) {
                    let inv = View {
                        loc: cx.loc(src),
                        dtype: cx.dtype(src),
                        offset: at.checked_mul(&idense[a]).unwrap(),
                        strides: idense.clone(),
                    };
                    let m =
                        MapKernel { dims: shape.clone(), out: out_view(slot), inputs: vec![inv], expr: Expr::In(0) };
                    ks.push(Kernel::Map(Box::new(m)));
                }
                at = at.checked_add(&shape[a]).unwrap();
            }
            return Ok(ks);
        }
        Op::ConstantOfShape { value } => {
            let t = value.clone();
            let e = if t.dtype().is_float() {
                Expr::F(t.cast(DType::F64).as_slice::<f64>().map_err(|e| unsupported(node, e))?[0], odt)
            } else {
                Expr::I(t.cast(DType::I64).as_slice::<i64>().map_err(|e| unsupported(node, e))?[0], odt)
            };
            mb.finish(out_view(0), e)
        }
        Op::Range => {
            let start = mb.operand(input(0).unwrap());
            let delta = mb.operand(input(2).unwrap());
            let i = Expr::Cast(Box::new(Expr::Index(0)), odt);
            mb.finish(out_view(0), Expr::bin(BinaryOp::Add, start, Expr::bin(BinaryOp::Mul, i, delta)))
        }
        Op::Trilu { upper } => {
            let r = oshape.len();
            let k = match input(1) {
                Some(k) => {
                    cx.known(k).and_then(|v| v.first().cloned()).ok_or_else(|| unsupported(node, "k not known"))?
                }
                None => Dim::fixed(0),
            };
            let k = k.as_fixed().ok_or_else(|| unsupported(node, "symbolic k"))?;
            let x = mb.operand(input(0).unwrap());
            let diff = Expr::bin(BinaryOp::Sub, Expr::Index(r - 1), Expr::Index(r - 2));
            let cond = if *upper {
                Expr::bin(BinaryOp::GreaterOrEqual, diff, Expr::I(k, DType::I64))
            } else {
                Expr::bin(BinaryOp::LessOrEqual, diff, Expr::I(k, DType::I64))
            };
            let zero = if odt.is_float() { Expr::F(0.0, odt) } else { Expr::I(0, odt) };
            mb.finish(out_view(0), Expr::Select(Box::new(cond), Box::new(x), Box::new(zero)))
        }
        Op::MatMul | Op::MatMulInteger => {
            return Ok(vec![lower_matmul(cx, node, &ins, out0, false, false, false)?]);
        }
        Op::MatMulNBits { .. } => return lower_matmul_nbits(cx, node, &ins, out0),
        Op::MatMulAct { act, glu, nbits } => {
            let mut ks = if nbits.is_some() {
                lower_matmul_nbits(cx, node, &ins, out0)?
            } else {
                if cx.dtype(ins[0].unwrap()) != DType::F32 || cx.dtype(ins[1].unwrap()) != DType::F32 {
                    return Err(unsupported(node, "MatMulAct needs f32 operands"));
                }
                vec![lower_matmul(cx, node, &ins, out0, false, false, *glu)?]
            };
            let bias = node.op.matmul_act_bias_slot().and_then(input).map(|b| cx.loc(b));
            let epi = super::matmul::Epilogue { act: (*act != crate::ir::Act::None).then_some(*act), bias, glu: *glu };
            match ks.last_mut() {
                Some(Kernel::MatMul(mm)) => mm.epi = epi,
                _ => return Err(unsupported(node, "no matmul kernel to fuse into")),
            }
            return Ok(ks);
        }
        Op::Gemm { alpha, beta, trans_a, trans_b } => {
            let mut ks = vec![lower_matmul(cx, node, &ins, out0, *trans_a, *trans_b, false)?];
            let c = input(2);
            if *alpha != 1.0 || c.is_some() {
                let mut m = MapBuilder::new(cx, oshape.clone());
                let acc = m.view(out_view(0));
                let mut e = Expr::bin(BinaryOp::Mul, acc, Expr::F(*alpha as f64, odt));
                if let Some(c) = c {
                    let cv = m.operand(c);
                    e = Expr::bin(BinaryOp::Add, e, Expr::bin(BinaryOp::Mul, cv, Expr::F(*beta as f64, odt)));
                }
                ks.push(m.finish(out_view(0), e));
            }
            return Ok(ks);
        }
        Op::Softmax { axis } | Op::LogSoftmax { axis } => {
            let a = norm_axis(*axis, oshape.len());
            let rows = axis_rows(cx, input(0).unwrap(), out0, a, false);
            Kernel::Softmax(rows, matches!(node.op, Op::LogSoftmax { .. }))
        }
        Op::LayerNorm { axis, epsilon } => {
            let x = input(0).unwrap();
            let shape = cx.shape(x);
            let a = norm_axis(*axis, shape.len());
            let outer: Vec<Dim> = shape[..a].to_vec();
            let len = shape[a..].iter().try_fold(Dim::fixed(1), |acc, d| acc.checked_mul(d)).unwrap();
            let odense = dense_strides(&outer);
            let row_of = |v: ValueRef, name: &str| -> Result<Dim> {
                let s = cx.shape(v);
                let numel = s.iter().try_fold(Dim::fixed(1), |acc, d| acc.checked_mul(d)).unwrap();
                if numel == Dim::fixed(1) {
                    Ok(Dim::fixed(0))
                } else if numel == len {
                    Ok(Dim::fixed(1))
                } else {
                    Err(unsupported(node, format!("{name} of shape {s:?} is not per-element of the normalized axes")))
                }
            };
            let outer_dense = dense_strides(&shape[..a]);
            let outer_x: Vec<Dim> = outer_dense.iter().map(|s| s.checked_mul(&len).unwrap()).collect();
            let mut locs = vec![cx.loc(x), cx.loc(out0), cx.loc(input(1).unwrap())];
            let mut dtypes = vec![cx.dtype(x), odt, cx.dtype(input(1).unwrap())];
            let mut os = vec![outer_x.clone(), outer_x, vec![Dim::fixed(0); a]];
            let mut rs = vec![Dim::fixed(1), Dim::fixed(1), row_of(input(1).unwrap(), "scale")?];
            let has_bias = input(2).is_some();
            if let Some(b) = input(2) {
                locs.push(cx.loc(b));
                dtypes.push(cx.dtype(b));
                os.push(vec![Dim::fixed(0); a]);
                rs.push(row_of(b, "bias")?);
            }
            let mut stats = (None, None);
            for slot in 1..node.outputs.len().min(3) {
                let v = out_ref(slot);
                if cx.locs.contains_key(&v) {
                    let idx = locs.len();
                    locs.push(cx.loc(v));
                    dtypes.push(cx.dtype(v));
                    os.push(odense.clone());
                    rs.push(Dim::fixed(0));
                    if slot == 1 {
                        stats.0 = Some(idx);
                    } else {
                        stats.1 = Some(idx);
                    }
                }
            }
            let rows = Rows { outer, outer_strides: os, len, row_strides: rs, locs, dtypes, multi: None };
            Kernel::LayerNorm { rows, eps: *epsilon, has_bias, stats }
        }
        Op::Reduce { kind, axes, keepdims: _, noop_with_empty_axes } => {
            let x = input(0).unwrap();
            let shape = cx.shape(x);
            let r = shape.len();
            let axes: Option<Vec<i64>> = match axes {
                Some(a) => Some(a.clone()),
                None => match input(1) {
                    Some(v) => Some(cx.known_fixed(v).ok_or_else(|| unsupported(node, "axes not known"))?),
                    None => None,
                },
            };
            let mut axes: Vec<usize> = match axes {
                Some(a) if !a.is_empty() => a.iter().map(|&a| norm_axis(a, r)).collect(),
                _ if *noop_with_empty_axes => {
                    let e = mb.view(View::dense(cx.loc(x), cx.dtype(x), &oshape));
                    return Ok(vec![mb.finish(out_view(0), e)]);
                }
                _ => (0..r).collect(),
            };
            axes.sort();
            axes.dedup();
            Kernel::Reduce(reduce_rows(cx, x, out0, &axes), *kind)
        }
        Op::ArgReduce { max, axis, select_last_index, .. } => {
            let x = input(0).unwrap();
            let a = norm_axis(*axis, cx.shape(x).len());
            let rows = reduce_rows(cx, x, out0, &[a]);
            Kernel::ArgReduce { rows, max: *max, last: *select_last_index }
        }
        Op::CumSum { exclusive, reverse } => {
            let x = input(0).unwrap();
            let a = cx
                .known_fixed(input(1).unwrap())
                .and_then(|v| v.first().copied())
                .ok_or_else(|| unsupported(node, "axis not known"))?;
            let a = norm_axis(a, oshape.len());
            let rows = axis_rows(cx, x, out0, a, false);
            Kernel::CumSum { rows, exclusive: *exclusive, reverse: *reverse }
        }
        Op::Gather { axis } => {
            let (data, idx) = (input(0).unwrap(), input(1).unwrap());
            let ds = cx.shape(data);
            let is = cx.shape(idx);
            let a = norm_axis(*axis, ds.len());
            let dd = dense_strides(&ds);
            let id = dense_strides(&is);
            // Output axes: data's leading axes, then the indices' axes, then data's trailing axes.
            let mut data_strides = Vec::new();
            let mut idx_strides = Vec::new();
            for s in &dd[..a] {
                data_strides.push(s.clone());
                idx_strides.push(Dim::fixed(0));
            }
            for s in &id {
                data_strides.push(Dim::fixed(0));
                idx_strides.push(s.clone());
            }
            for s in &dd[a + 1..] {
                data_strides.push(s.clone());
                idx_strides.push(Dim::fixed(0));
            }
            Kernel::Gather(Box::new(GatherKernel {
                dims: oshape.clone(),
                out: out_view(0),
                data: View { loc: cx.loc(data), dtype: cx.dtype(data), offset: Dim::fixed(0), strides: data_strides },
                indices: View { loc: cx.loc(idx), dtype: cx.dtype(idx), offset: Dim::fixed(0), strides: idx_strides },
                components: vec![(Dim::fixed(0), dd[a].clone(), ds[a].clone())],
            }))
        }
        Op::GatherElements { axis } => {
            let (data, idx) = (input(0).unwrap(), input(1).unwrap());
            let ds = cx.shape(data);
            let a = norm_axis(*axis, ds.len());
            let dd = dense_strides(&ds);
            let mut data_strides = dd.clone();
            data_strides[a] = Dim::fixed(0);
            Kernel::Gather(Box::new(GatherKernel {
                dims: oshape.clone(),
                out: out_view(0),
                data: View { loc: cx.loc(data), dtype: cx.dtype(data), offset: Dim::fixed(0), strides: data_strides },
                indices: View::dense(cx.loc(idx), cx.dtype(idx), &cx.shape(idx)),
                components: vec![(Dim::fixed(0), dd[a].clone(), ds[a].clone())],
            }))
        }
        Op::GatherND { batch_dims } => {
            let (data, idx) = (input(0).unwrap(), input(1).unwrap());
            let ds = cx.shape(data);
            let is = cx.shape(idx);
            let b = *batch_dims as usize;
            let last =
                is.last().and_then(|d| d.as_fixed()).ok_or_else(|| unsupported(node, "symbolic index depth"))? as usize;
            let dd = dense_strides(&ds);
            let id = dense_strides(&is);
            let mut data_strides = Vec::new();
            let mut idx_strides = Vec::new();
            for a in 0..is.len() - 1 {
                data_strides.push(if a < b { dd[a].clone() } else { Dim::fixed(0) });
                idx_strides.push(id[a].clone());
            }
            for s in &dd[b + last..] {
                data_strides.push(s.clone());
                idx_strides.push(Dim::fixed(0));
            }
            let components = (0..last).map(|t| (Dim::fixed(t as i64), dd[b + t].clone(), ds[b + t].clone())).collect();
            Kernel::Gather(Box::new(GatherKernel {
                dims: oshape.clone(),
                out: out_view(0),
                data: View { loc: cx.loc(data), dtype: cx.dtype(data), offset: Dim::fixed(0), strides: data_strides },
                indices: View { loc: cx.loc(idx), dtype: cx.dtype(idx), offset: Dim::fixed(0), strides: idx_strides },
                components,
            }))
        }
        Op::QuantizeLinear { axis, block_size, .. } => {
            // y = saturate(round(x / scale) + zero_point)
            quant_map(cx, node, n, *axis, *block_size, |x, xdt, s, z| {
                let mut e = Expr::un(UnaryOp::Round, Expr::bin(BinaryOp::Div, cast_to(x, xdt, DType::F32), s));
                if let Some(z) = z {
                    e = Expr::bin(BinaryOp::Add, e, Expr::Cast(Box::new(z), DType::F32));
                }
                Expr::Cast(Box::new(e), odt)
            })?
        }
        Op::DequantizeLinear { axis, block_size } => {
            // y = (x - zero_point) * scale, the subtraction in i64 so int32 inputs stay exact.
            quant_map(cx, node, n, *axis, *block_size, |x, _, s, z| {
                let xv = match z {
                    Some(z) => {
                        let d = Expr::bin(
                            BinaryOp::Sub,
                            Expr::Cast(Box::new(x), DType::I64),
                            Expr::Cast(Box::new(z), DType::I64),
                        );
                        Expr::Cast(Box::new(d), odt)
                    }
                    None => Expr::Cast(Box::new(x), odt),
                };
                Expr::bin(BinaryOp::Mul, xv, s)
            })?
        }
        Op::DynamicQuantizeLinear => return lower_dynamic_quantize(cx, n),
        Op::RmsNorm { axis, epsilon } => {
            let x = input(0).unwrap();
            let shape = cx.shape(x);
            let a = norm_axis(*axis, shape.len());
            let len = shape[a..].iter().try_fold(Dim::fixed(1), |acc, d| acc.checked_mul(d)).unwrap();
            let w = input(1).unwrap();
            let ws = cx.shape(w);
            let wn = ws.iter().try_fold(Dim::fixed(1), |acc, d| acc.checked_mul(d)).unwrap();
            let w_stride = if wn == Dim::fixed(1) {
                Dim::fixed(0)
            } else if wn == len {
                Dim::fixed(1)
            } else {
                return Err(unsupported(
                    node,
                    format!("scale of shape {ws:?} is not per-element of the normalized axes"),
                ));
            };
            let outer_x: Vec<Dim> = dense_strides(&shape[..a]).iter().map(|s| s.checked_mul(&len).unwrap()).collect();
            let rows = Rows {
                outer: shape[..a].to_vec(),
                outer_strides: vec![outer_x.clone(), outer_x, vec![Dim::fixed(0); a]],
                len,
                row_strides: vec![Dim::fixed(1), Dim::fixed(1), w_stride],
                locs: vec![cx.loc(x), cx.loc(out0), cx.loc(w)],
                dtypes: vec![cx.dtype(x), odt, cx.dtype(w)],
                multi: None,
            };
            Kernel::RmsNorm { rows, eps: *epsilon }
        }
        Op::Attention { scale } => lower_attention(cx, node, &ins, out0, *scale)?,
        Op::Shape { .. } | Op::Size | Op::Input { .. } | Op::Const { .. } => {
            return Err(unsupported(node, "value should have been known at compile time"));
        }
    };
    Ok(vec![k])
}

fn cast_to(e: Expr, from: DType, to: DType) -> Expr {
    if from == to {
        e
    } else {
        Expr::Cast(Box::new(e), to)
    }
}

fn pow_by_const(x: Expr, p: f64, dt: DType) -> Expr {
    let mul = |a: Expr, b: Expr| Expr::bin(BinaryOp::Mul, a, b);
    match p {
        1.0 => x,
        2.0 => mul(x.clone(), x),
        3.0 => mul(mul(x.clone(), x.clone()), x),
        0.5 => Expr::un(UnaryOp::Sqrt, x),
        -1.0 => Expr::un(UnaryOp::Reciprocal, x),
        -0.5 => Expr::un(UnaryOp::Reciprocal, Expr::un(UnaryOp::Sqrt, x)),
        _ => Expr::bin(BinaryOp::Pow, x, Expr::F(p, dt)),
    }
}

/// QuantizeLinear / DequantizeLinear as one map: `expr(x, x dtype, scale, zero point)`. Scale and
/// zero point are per tensor, per slice along `axis`, or per block of `block` elements along it;
/// blocks split the axis into (blocks, block) so every view stays affine.
fn quant_map(
    cx: &LowerCx,
    node: &Node,
    n: NodeIndex,
    axis: i64,
    block: i64,
    expr: impl Fn(Expr, DType, Expr, Option<Expr>) -> Expr,
) -> Result<Kernel> {
    let ins = cx.g.inputs_of(n);
    let x = ins[0].unwrap();
    let shape = cx.shape(x);
    let a = norm_axis(axis, shape.len().max(1));
    let out = ValueRef { node: n, slot: 0 };
    let dense = dense_strides(&shape);
    // Iteration space and the x/y strides; `split` is the axis cut into (blocks, block).
    let (dims, xs, split) = if block > 0 {
        let d = shape[a].as_fixed().ok_or_else(|| unsupported(node, "blocked axis must have a fixed size"))?;
        if d % block != 0 {
            return Err(unsupported(node, format!("axis size {d} is not a multiple of block_size {block}")));
        }
        let mut dims = shape.clone();
        dims.splice(a..=a, [Dim::fixed(d / block), Dim::fixed(block)]);
        let mut xs = dense.clone();
        xs.splice(a..=a, [dense[a].checked_mul(&Dim::fixed(block)).unwrap(), dense[a].clone()]);
        (dims, xs, true)
    } else {
        (shape.clone(), dense.clone(), false)
    };
    let mut inputs = vec![View { loc: cx.loc(x), dtype: cx.dtype(x), offset: Dim::fixed(0), strides: xs.clone() }];
    let mut param = |v: ValueRef| -> Result<Expr> {
        let ps = cx.shape(v);
        let numel = ps.iter().try_fold(Dim::fixed(1), |acc, d| acc.checked_mul(d)).unwrap();
        if numel == Dim::fixed(1) {
            if let Some(e) = cx.scalar_const(v) {
                return Ok(e);
            }
        }
        let mut strides = vec![Dim::fixed(0); dims.len()];
        if numel != Dim::fixed(1) {
            if split {
                let pd = dense_strides(&ps);
                if ps.len() != shape.len() {
                    return Err(unsupported(node, format!("blocked parameter of shape {ps:?} for input {shape:?}")));
                }
                for (k, st) in pd.iter().enumerate() {
                    let at = if k <= a { k } else { k + 1 };
                    strides[at] = st.clone();
                }
                strides[a + 1] = Dim::fixed(0);
            } else if ps.len() == 1 && ps[0] == shape[a] {
                strides[a] = Dim::fixed(1);
            } else {
                return Err(unsupported(node, format!("parameter of shape {ps:?} is neither per-tensor nor per-axis")));
            }
        }
        inputs.push(View { loc: cx.loc(v), dtype: cx.dtype(v), offset: Dim::fixed(0), strides });
        Ok(Expr::In(inputs.len() - 1))
    };
    let s = param(ins[1].unwrap())?;
    let z = match ins.get(2).copied().flatten() {
        Some(z) => Some(param(z)?),
        None => None,
    };
    let e = expr(Expr::In(0), cx.dtype(x), s, z);
    let out_view = View { loc: cx.loc(out), dtype: cx.dtype(out), offset: Dim::fixed(0), strides: xs };
    Ok(Kernel::Map(Box::new(MapKernel { dims, out: out_view, inputs, expr: e })))
}

/// Rows along axis `a` of `x`, written at the same positions of `out` (same shape).
fn axis_rows(cx: &LowerCx, x: ValueRef, out: ValueRef, a: usize, _: bool) -> Rows {
    let shape = cx.shape(x);
    let dense = dense_strides(&shape);
    let outer: Vec<Dim> = shape.iter().enumerate().filter(|(i, _)| *i != a).map(|(_, d)| d.clone()).collect();
    let os: Vec<Dim> = dense.iter().enumerate().filter(|(i, _)| *i != a).map(|(_, d)| d.clone()).collect();
    Rows {
        outer,
        outer_strides: vec![os.clone(), os],
        len: shape[a].clone(),
        row_strides: vec![dense[a].clone(), dense[a].clone()],
        locs: vec![cx.loc(x), cx.loc(out)],
        dtypes: vec![cx.dtype(x), cx.dtype(out)],
        multi: None,
    }
}

/// Rows for reducing `axes` of `x` into `out` (keepdims or not: the output is dense over the kept
/// axes either way).
fn reduce_rows(cx: &LowerCx, x: ValueRef, out: ValueRef, axes: &[usize]) -> Rows {
    let shape = cx.shape(x);
    let dense = dense_strides(&shape);
    let kept: Vec<usize> = (0..shape.len()).filter(|a| !axes.contains(a)).collect();
    let outer: Vec<Dim> = kept.iter().map(|&a| shape[a].clone()).collect();
    let os_in: Vec<Dim> = kept.iter().map(|&a| dense[a].clone()).collect();
    let os_out = dense_strides(&outer);
    // One row: the reduced axes must form one arithmetic progression of addresses.
    let mut len = Dim::fixed(1);
    let mut stride: Option<Dim> = None;
    let mut adjacent = true;
    for &a in axes.iter().rev() {
        match &stride {
            None => stride = Some(dense[a].clone()),
            Some(s) => adjacent &= dense[a] == len.checked_mul(s).unwrap(),
        }
        len = len.checked_mul(&shape[a]).unwrap();
    }
    // Axes that are not one stride apart: a row over several axes (index split at run time).
    let multi = (!adjacent).then(|| {
        let dims = axes.iter().map(|&a| shape[a].clone()).collect();
        let strides = vec![axes.iter().map(|&a| dense[a].clone()).collect(), vec![Dim::fixed(0); axes.len()]];
        (dims, strides)
    });
    Rows {
        multi,
        outer,
        outer_strides: vec![os_in, os_out],
        len,
        row_strides: vec![stride.unwrap_or_else(|| Dim::fixed(1)), Dim::fixed(0)],
        locs: vec![cx.loc(x), cx.loc(out)],
        dtypes: vec![cx.dtype(x), cx.dtype(out)],
    }
}

fn lower_matmul(
    cx: &LowerCx,
    node: &Node,
    ins: &[Option<ValueRef>],
    out: ValueRef,
    trans_a: bool,
    trans_b: bool,
    glu: bool,
) -> Result<Kernel> {
    let (a, b) = (ins[0].unwrap(), ins[1].unwrap());
    let (mut sa, mut sb) = (cx.shape(a), cx.shape(b));
    let a_vec = sa.len() == 1;
    let b_vec = sb.len() == 1;
    if a_vec {
        sa.insert(0, Dim::fixed(1));
    }
    if b_vec {
        sb.push(Dim::fixed(1));
    }
    let (ra, rb) = (sa.len(), sb.len());
    let da = dense_strides(&sa);
    let db = dense_strides(&sb);
    let (m, k, am, ak) = if trans_a {
        (sa[ra - 1].clone(), sa[ra - 2].clone(), da[ra - 1].clone(), da[ra - 2].clone())
    } else {
        (sa[ra - 2].clone(), sa[ra - 1].clone(), da[ra - 2].clone(), da[ra - 1].clone())
    };
    let (n, bk, bn) = if trans_b {
        (sb[rb - 2].clone(), db[rb - 1].clone(), db[rb - 2].clone())
    } else {
        (sb[rb - 1].clone(), db[rb - 2].clone(), db[rb - 1].clone())
    };
    // SwiGLU: B holds 2N columns (gate, up), the output N.
    let n = match (glu, n.as_fixed()) {
        (false, _) => n,
        (true, Some(w)) if w % 2 == 0 => Dim::fixed(w / 2),
        _ => return Err(unsupported(node, "glu needs a fixed, even number of weight columns")),
    };
    // Batch axes: numpy broadcasting of the leading axes.
    let nb = ra.max(rb) - 2;
    let mut batch = Vec::new();
    let (mut bsa, mut bsb) = (Vec::new(), Vec::new());
    for i in 0..nb {
        let ia = (i + ra - 2).checked_sub(nb);
        let ib = (i + rb - 2).checked_sub(nb);
        let dim_a = ia.map(|x| sa[x].clone()).unwrap_or_else(|| Dim::fixed(1));
        let dim_b = ib.map(|x| sb[x].clone()).unwrap_or_else(|| Dim::fixed(1));
        let d = if dim_a == Dim::fixed(1) { dim_b.clone() } else { dim_a.clone() };
        bsa.push(if dim_a == Dim::fixed(1) { Dim::fixed(0) } else { da[ia.unwrap()].clone() });
        bsb.push(if dim_b == Dim::fixed(1) { Dim::fixed(0) } else { db[ib.unwrap()].clone() });
        batch.push(d);
    }
    let mut full = batch.clone();
    full.extend([m.clone(), n.clone()]);
    let dout = dense_strides(&full);
    let bso = dout[..nb].to_vec();
    let odt = cx.dtype(out);
    let zp = |slot: usize, along: &Dim| -> Result<Option<(Loc, DType, Dim)>> {
        let Some(z) = ins.get(slot).copied().flatten() else { return Ok(None) };
        let s = cx.shape(z);
        let numel = s.iter().try_fold(Dim::fixed(1), |acc, d| acc.checked_mul(d)).unwrap();
        let stride = if numel == Dim::fixed(1) {
            Dim::fixed(0)
        } else if s.len() == 1 && s[0] == *along {
            Dim::fixed(1)
        } else {
            return Err(unsupported(
                node,
                format!("zero point of shape {s:?} is neither per-tensor nor per-row/column"),
            ));
        };
        Ok(Some((cx.loc(z), cx.dtype(z), stride)))
    };
    let (a_zero, b_zero) = if node.op == Op::MatMulInteger { (zp(2, &m)?, zp(3, &n)?) } else { (None, None) };
    Ok(Kernel::MatMul(Box::new(MatMulKernel {
        batch,
        m,
        k,
        n: n.clone(),
        a: Operand { loc: cx.loc(a), dtype: cx.dtype(a), batch_strides: bsa, strides: [am, ak] },
        // Packed weights: k steps are one 16-float panel row apart, columns are contiguous inside a
        // panel (the tile finds the panel).
        b: if cx.packed.contains(&b) {
            Operand { loc: cx.loc(b), dtype: cx.dtype(b), batch_strides: bsb, strides: [Dim::fixed(16), Dim::fixed(1)] }
        } else {
            Operand { loc: cx.loc(b), dtype: cx.dtype(b), batch_strides: bsb, strides: [bk, bn] }
        },
        b_packed: cx.packed.contains(&b),
        b_nbits: None,
        b_sparse: cx.sparse.get(&b).copied(),
        epi: Default::default(),
        out: Operand {
            loc: cx.loc(out),
            dtype: odt,
            batch_strides: bso,
            strides: [dout[nb].clone(), dout[nb + 1].clone()],
        },
        a_zero,
        b_zero,
    })))
}

/// MatMulNBits: A's leading axes flattened into rows against the packed quantized weight.
fn lower_matmul_nbits(cx: &LowerCx, node: &Node, ins: &[Option<ValueRef>], out: ValueRef) -> Result<Vec<Kernel>> {
    let (a, b) = (ins[0].unwrap(), ins[1].unwrap());
    let pk =
        *cx.nbits.get(&b).ok_or_else(|| unsupported(node, "MatMulNBits needs constant B, scales and zero points"))?;
    if cx.dtype(a) != DType::F32 {
        return Err(unsupported(node, format!("MatMulNBits of {} input", cx.dtype(a))));
    }
    let sa = cx.shape(a);
    let rows = sa[..sa.len().saturating_sub(1)]
        .iter()
        .try_fold(Dim::fixed(1), |acc, d| acc.checked_mul(d))
        .ok_or_else(|| unsupported(node, "row count overflows"))?;
    let (k, n) = (Dim::fixed(pk.layout.k as i64), Dim::fixed(pk.layout.n as i64));
    let dense =
        |loc, dtype, row: &Dim| Operand { loc, dtype, batch_strides: vec![], strides: [row.clone(), Dim::fixed(1)] };
    let mut kernels = Vec::new();
    let mut a_loc = cx.loc(a);
    if node.op.int8_activations() {
        // Int8 activations: rounded once per call, before the column tasks start.
        let scratch = Loc::Arena(cx.scratch.ok_or_else(|| unsupported(node, "no activation scratch planned"))?);
        kernels.push(Kernel::QuantizeRows { a: a_loc, rows: rows.clone(), scratch, pk });
        a_loc = scratch;
    }
    kernels.push(Kernel::MatMul(Box::new(MatMulKernel {
        batch: vec![],
        m: rows,
        a: dense(a_loc, DType::F32, &k),
        b: dense(cx.loc(b), DType::U8, &Dim::fixed(0)),
        out: dense(cx.loc(out), DType::F32, &n),
        k,
        n,
        a_zero: None,
        b_zero: None,
        b_packed: false,
        b_nbits: Some(pk),
        b_sparse: None,
        epi: Default::default(),
    })));
    Ok(kernels)
}

/// DynamicQuantizeLinear: min/max reductions into scratch, then scale, zero point and y as maps.
fn lower_dynamic_quantize(cx: &LowerCx, n: NodeIndex) -> Result<Vec<Kernel>> {
    let g = cx.g;
    let x = g.inputs_of(n)[0].unwrap();
    let shape = cx.shape(x);
    let numel = shape.iter().try_fold(Dim::fixed(1), |acc, d| acc.checked_mul(d)).unwrap();
    let scratch = cx.scratch.expect("planner gives DynamicQuantizeLinear scratch");
    let (min_loc, max_loc) = (Loc::Arena(scratch), Loc::Arena(scratch + 4));
    let row = |loc: Loc| Rows {
        outer: vec![],
        outer_strides: vec![vec![], vec![]],
        len: numel.clone(),
        row_strides: vec![Dim::fixed(1), Dim::fixed(0)],
        locs: vec![cx.loc(x), loc],
        dtypes: vec![DType::F32, DType::F32],
        multi: None,
    };
    let (y, s, z) = (ValueRef { node: n, slot: 0 }, ValueRef { node: n, slot: 1 }, ValueRef { node: n, slot: 2 });
    // Scale and zero point go to scratch too when the graph does not use them.
    let s_loc = cx.locs.get(&s).copied().unwrap_or(Loc::Arena(scratch + 8));
    let z_loc = cx.locs.get(&z).copied().unwrap_or(Loc::Arena(scratch + 12));
    let scalar = |loc: Loc, dt: DType| View { loc, dtype: dt, offset: Dim::fixed(0), strides: vec![] };
    let f = |v: f64| Expr::F(v, DType::F32);
    let zero_f = f(0.0);
    // scale = (max(0, max) - min(0, min)) / 255
    let lo = Expr::Min(Box::new(Expr::In(0)), Box::new(zero_f.clone()));
    let hi = Expr::Max(Box::new(Expr::In(1)), Box::new(zero_f.clone()));
    let scale_e = Expr::bin(BinaryOp::Div, Expr::bin(BinaryOp::Sub, hi, lo.clone()), f(255.0));
    let scale_k = MapKernel {
        dims: vec![],
        out: scalar(s_loc, DType::F32),
        inputs: vec![scalar(min_loc, DType::F32), scalar(max_loc, DType::F32)],
        expr: scale_e,
    };
    // zp = scale == 0 ? 0 : clamp(round(-min/scale), 0, 255)
    let sc = Expr::In(1);
    let is0 = Expr::bin(BinaryOp::Equal, sc.clone(), zero_f.clone());
    let q = Expr::un(UnaryOp::Round, Expr::bin(BinaryOp::Div, Expr::un(UnaryOp::Neg, lo), sc.clone()));
    let zp_f = Expr::Select(Box::new(is0.clone()), Box::new(zero_f.clone()), Box::new(q));
    let zp_k = MapKernel {
        dims: vec![],
        out: scalar(z_loc, DType::U8),
        inputs: vec![scalar(min_loc, DType::F32), scalar(s_loc, DType::F32)],
        expr: Expr::Cast(Box::new(zp_f), DType::U8),
    };
    // y = clamp(round(x / scale) + zp, 0, 255)
    let zero_strides = vec![Dim::fixed(0); shape.len()];
    let bview = |loc: Loc, dt: DType| View { loc, dtype: dt, offset: Dim::fixed(0), strides: zero_strides.clone() };
    let s_in = Expr::In(1);
    let q = Expr::un(UnaryOp::Round, Expr::bin(BinaryOp::Div, Expr::In(0), s_in.clone()));
    let q = Expr::Select(Box::new(Expr::bin(BinaryOp::Equal, s_in, zero_f.clone())), Box::new(zero_f), Box::new(q));
    let yv = Expr::bin(BinaryOp::Add, q, Expr::Cast(Box::new(Expr::In(2)), DType::F32));
    let y_k = MapKernel {
        dims: shape.clone(),
        out: View::dense(cx.loc(y), DType::U8, &shape),
        inputs: vec![View::dense(cx.loc(x), DType::F32, &shape), bview(s_loc, DType::F32), bview(z_loc, DType::U8)],
        expr: Expr::Cast(Box::new(yv), DType::U8),
    };
    Ok(vec![
        Kernel::Reduce(row(min_loc), ReduceKind::Min),
        Kernel::Reduce(row(max_loc), ReduceKind::Max),
        Kernel::Map(Box::new(scale_k)),
        Kernel::Map(Box::new(zp_k)),
        Kernel::Map(Box::new(y_k)),
    ])
}

/// A KV-cache Concat (`kv_cache`): the past copied into the region when the caller passed it,
/// the new rows written at `past`, the present copied out when the caller wants it.
fn lower_kv_append(
    cx: &LowerCx,
    slot: &super::kv_cache::KvSlot,
    ins: &[Option<ValueRef>],
    out: ValueRef,
) -> Vec<Kernel> {
    let (past, new) = (ins[0].unwrap(), ins[1].unwrap());
    let region = |offset: Dim| View { loc: cx.loc(out), dtype: DType::F32, offset, strides: slot.strides.clone() };
    let copy = |dims: Vec<Dim>, out: View, input: View| {
        Kernel::Map(Box::new(MapKernel { dims, out, inputs: vec![input], expr: Expr::In(0) }))
    };
    let (ps, ns, os) = (cx.shape(past), cx.shape(new), cx.shape(out));
    let at = ps[slot.axis].checked_mul(&slot.strides[slot.axis]).expect("small fixed stride");
    let present = Loc::Output(slot.output);
    vec![
        Kernel::IfBuffer(
            cx.loc(past),
            Box::new(copy(ps.clone(), region(Dim::fixed(0)), View::dense(cx.loc(past), DType::F32, &ps))),
        ),
        copy(ns.clone(), region(at), View::dense(cx.loc(new), DType::F32, &ns)),
        Kernel::IfBuffer(
            present,
            Box::new(copy(os.clone(), View::dense(present, DType::F32, &os), region(Dim::fixed(0)))),
        ),
    ]
}

/// Attention on dense f32 q/k/v; the mask is read through a broadcast view over [b, hq, s, t].
fn lower_attention(cx: &LowerCx, node: &Node, ins: &[Option<ValueRef>], out: ValueRef, scale: f32) -> Result<Kernel> {
    let (q, k, v) = (ins[0].unwrap(), ins[1].unwrap(), ins[2].unwrap());
    let mask = ins.get(3).copied().flatten();
    if [q, k, v, out].iter().chain(mask.iter()).any(|&x| cx.dtype(x) != DType::F32) {
        return Err(unsupported(node, "only f32 attention is compiled"));
    }
    let (qs, ks, vs) = (cx.shape(q), cx.shape(k), cx.shape(v));
    let heads = |d: &Dim| d.as_fixed().filter(|&h| h > 0).map(|h| h as usize);
    let (Some(hq), Some(hkv)) = (heads(&qs[1]), heads(&ks[1])) else {
        return Err(unsupported(node, "head counts must be fixed"));
    };
    if hq % hkv != 0 {
        return Err(unsupported(node, format!("{hq} query heads are not a multiple of {hkv} kv heads")));
    }
    let full = [qs[0].clone(), qs[1].clone(), qs[2].clone(), ks[2].clone()];
    Ok(Kernel::Attention(Box::new(AttentionKernel {
        batch: qs[0].clone(),
        q_heads: hq,
        kv_heads: hkv,
        s: qs[2].clone(),
        t: ks[2].clone(),
        d: qs[3].clone(),
        dv: vs[3].clone(),
        k_rows: super::kv_cache::rows_of(cx.kv, k).unwrap_or_else(|| ks[2].clone()),
        v_rows: super::kv_cache::rows_of(cx.kv, v).unwrap_or_else(|| vs[2].clone()),
        q: cx.loc(q),
        k: cx.loc(k),
        v: cx.loc(v),
        out: cx.loc(out),
        mask: mask.map(|m| cx.broadcast_view(m, &full)),
        scale,
    })))
}

//! The map kernel: one output element per point of an iteration space, computed by an expression
//! over input elements. Inputs and the output are affine views (offset + stride per iteration
//! axis, in elements), so broadcasting, Transpose, Slice, Expand, Concat, Split and Tile are all
//! just views, and chains of elementwise ops can fuse into one expression.
//!
//! Contiguous axes are coalesced first; when the expression is pure f32 and the innermost axis is
//! contiguous for the output (stride 1) and every input (stride 1 or 0), the inner loop runs on
//! f32x4 vectors with a scalar tail.

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, InstBuilder, Type, Value};

use super::emit::{mem, Kb, Loc};
use super::math::Fm;
use crate::ir::{BinaryOp, DType, Dim, UnaryOp};

#[derive(Clone, Debug, PartialEq)]
pub struct View {
    pub loc: Loc,
    pub dtype: DType,
    /// Element offset of index 0.
    pub offset: Dim,
    /// Element stride per iteration axis (0 broadcasts).
    pub strides: Vec<Dim>,
}

impl View {
    /// A dense row-major view of `shape`.
    pub fn dense(loc: Loc, dtype: DType, shape: &[Dim]) -> View {
        View { loc, dtype, offset: Dim::fixed(0), strides: dense_strides(shape) }
    }
}

/// Row-major strides of a shape.
pub fn dense_strides(shape: &[Dim]) -> Vec<Dim> {
    let mut strides = vec![Dim::fixed(1); shape.len()];
    for a in (0..shape.len().saturating_sub(1)).rev() {
        strides[a] = strides[a + 1].checked_mul(&shape[a + 1]).expect("shape sizes were checked");
    }
    strides
}

#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    /// The element of input view `i`.
    In(usize),
    /// A float constant of dtype F32 or F64.
    F(f64, DType),
    /// An integer or bool constant.
    I(i64, DType),
    /// The iteration index on an axis (i64).
    Index(usize),
    Un(UnaryOp, Box<Expr>),
    Bin(BinaryOp, Box<Expr>, Box<Expr>),
    Min(Box<Expr>, Box<Expr>),
    Max(Box<Expr>, Box<Expr>),
    /// cond (bool), then, else.
    Select(Box<Expr>, Box<Expr>, Box<Expr>),
    Cast(Box<Expr>, DType),
}

impl Expr {
    pub fn un(op: UnaryOp, a: Expr) -> Expr {
        Expr::Un(op, Box::new(a))
    }
    pub fn bin(op: BinaryOp, a: Expr, b: Expr) -> Expr {
        Expr::Bin(op, Box::new(a), Box::new(b))
    }

    pub fn dtype(&self, inputs: &[View]) -> DType {
        match self {
            Expr::In(i) => inputs[*i].dtype,
            Expr::F(_, d) | Expr::I(_, d) | Expr::Cast(_, d) => *d,
            Expr::Index(_) => DType::I64,
            Expr::Un(op, a) => match op {
                UnaryOp::IsNaN | UnaryOp::IsInf { .. } => DType::Bool,
                _ => a.dtype(inputs),
            },
            Expr::Bin(op, a, _) => {
                if op.is_comparison() {
                    DType::Bool
                } else {
                    a.dtype(inputs)
                }
            }
            Expr::Min(a, _) | Expr::Max(a, _) => a.dtype(inputs),
            Expr::Select(_, a, _) => a.dtype(inputs),
        }
    }

    /// Whether the f32x4 path can evaluate it: f32 in, f32 out, float arithmetic only.
    fn vectorizable(&self, inputs: &[View]) -> bool {
        let f32 = |e: &Expr| e.dtype(inputs) == DType::F32;
        match self {
            Expr::In(i) => inputs[*i].dtype == DType::F32,
            Expr::F(_, d) => *d == DType::F32,
            Expr::I(..) | Expr::Index(_) | Expr::Cast(..) | Expr::Select(..) => false,
            Expr::Un(op, a) => {
                !matches!(op, UnaryOp::IsNaN | UnaryOp::IsInf { .. } | UnaryOp::Not) && f32(a) && a.vectorizable(inputs)
            }
            Expr::Bin(op, a, b) => {
                matches!(op, BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul | BinaryOp::Div | BinaryOp::Pow)
                    && f32(a)
                    && a.vectorizable(inputs)
                    && b.vectorizable(inputs)
            }
            Expr::Min(a, b) | Expr::Max(a, b) => f32(a) && a.vectorizable(inputs) && b.vectorizable(inputs),
        }
    }

    fn uses_index(&self) -> bool {
        match self {
            Expr::Index(_) => true,
            Expr::In(_) | Expr::F(..) | Expr::I(..) => false,
            Expr::Un(_, a) | Expr::Cast(a, _) => a.uses_index(),
            Expr::Bin(_, a, b) | Expr::Min(a, b) | Expr::Max(a, b) => a.uses_index() || b.uses_index(),
            Expr::Select(c, a, b) => c.uses_index() || a.uses_index() || b.uses_index(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct MapKernel {
    pub dims: Vec<Dim>,
    pub out: View,
    pub inputs: Vec<View>,
    pub expr: Expr,
}

impl MapKernel {
    /// Drops size-1 axes and merges axes that are contiguous in every view.
    fn coalesced(&self) -> MapKernel {
        let mut k = self.clone();
        if self.expr.uses_index() {
            return k;
        }
        let one = Dim::fixed(1);
        let mut a = 0;
        while a < k.dims.len() {
            if k.dims[a] == one {
                k.dims.remove(a);
                k.out.strides.remove(a);
                k.inputs.iter_mut().for_each(|v| drop(v.strides.remove(a)));
            } else {
                a += 1;
            }
        }
        let mut a = 0;
        while a + 1 < k.dims.len() {
            let d = k.dims[a + 1].clone();
            let mergeable = |v: &View| v.strides[a + 1].checked_mul(&d).is_some_and(|s| s == v.strides[a]);
            if mergeable(&k.out) && k.inputs.iter().all(mergeable) {
                k.dims[a] = k.dims[a].checked_mul(&d).expect("sizes checked");
                k.dims.remove(a + 1);
                let inner = k.out.strides.remove(a + 1);
                k.out.strides[a] = inner;
                for v in &mut k.inputs {
                    let inner = v.strides.remove(a + 1);
                    v.strides[a] = inner;
                }
            } else {
                a += 1;
            }
        }
        k
    }
}

/// The type an element computes in: small integers and bools widen to i32.
pub fn compute_type(dt: DType) -> Type {
    match dt {
        DType::F32 => types::F32,
        DType::F64 => types::F64,
        DType::I64 => types::I64,
        DType::I8 | DType::U8 | DType::Bool | DType::I32 => types::I32,
    }
}

/// Loads one element and widens it to its compute type.
pub fn load_elem(kb: &mut Kb, dt: DType, addr: Value, off: i32) -> Value {
    let ins = kb.fb.ins();
    match dt {
        DType::F32 => ins.load(types::F32, mem(), addr, off),
        DType::F64 => ins.load(types::F64, mem(), addr, off),
        DType::I64 => ins.load(types::I64, mem(), addr, off),
        DType::I32 => ins.load(types::I32, mem(), addr, off),
        DType::I8 => ins.sload8(types::I32, mem(), addr, off),
        DType::U8 | DType::Bool => ins.uload8(types::I32, mem(), addr, off),
    }
}

/// Stores a compute-typed value as `dt`.
pub fn store_elem(kb: &mut Kb, dt: DType, v: Value, addr: Value, off: i32) {
    match dt {
        DType::I8 | DType::U8 | DType::Bool => {
            kb.fb.ins().istore8(mem(), v, addr, off);
        }
        _ => {
            kb.fb.ins().store(mem(), v, addr, off);
        }
    }
}

pub fn emit_map(kb: &mut Kb, kernel: &MapKernel) {
    let k = kernel.coalesced();
    let rank = k.dims.len();
    let dims: Vec<Value> = k.dims.iter().map(|d| kb.dim(d)).collect();
    let mut views: Vec<&View> = vec![&k.out];
    views.extend(k.inputs.iter());
    let bases: Vec<Value> = views.iter().map(|v| kb.base(v.loc)).collect();
    let offsets: Vec<Value> = views.iter().map(|v| kb.dim(&v.offset)).collect();
    let strides: Vec<Vec<Value>> = views.iter().map(|v| v.strides.iter().map(|s| kb.dim(s)).collect()).collect();
    let inner_fixed = |v: &View| v.strides.last().and_then(|s| s.as_fixed());
    let vector = rank > 0
        && kb.target.simd()
        && k.out.dtype == DType::F32
        && k.expr.vectorizable(&k.inputs)
        && inner_fixed(&k.out) == Some(1)
        && k.inputs.iter().all(|v| matches!(inner_fixed(v), Some(0) | Some(1)));
    let ctx = Ctx { k: &k, views: &views, bases, dims, strides, vector };
    ctx.level(kb, offsets, rank);
}

struct Ctx<'a> {
    k: &'a MapKernel,
    views: &'a [&'a View],
    bases: Vec<Value>,
    dims: Vec<Value>,
    strides: Vec<Vec<Value>>,
    vector: bool,
}

impl Ctx<'_> {
    /// Loops over axis `axis` carrying each view's element offset; the last axis is the inner loop.
    /// The outer axes as a loop nest carrying each view's element offset (`Kb::loop_nest`); the
    /// last axis is the inner loop.
    fn level(&self, kb: &mut Kb, offs: Vec<Value>, rank: usize) {
        if rank == 0 {
            let ptrs = self.ptrs(kb, &offs);
            self.element(kb, &ptrs, &[], None, types::INVALID);
            return;
        }
        let outer = &self.dims[..rank - 1];
        kb.loop_nest(outer, &self.strides, offs, &mut Vec::new(), &mut |kb, offs, idx| {
            self.inner(kb, offs, idx, rank - 1)
        });
    }

    /// The inner loop over `axis`: f32x4 steps when vectorised, then a scalar tail.
    fn inner(&self, kb: &mut Kb, offs: &[Value], idx: &[Value], axis: usize) {
        let ptrs = self.ptrs(kb, offs);
        let zero = kb.iconst(0);
        let n = self.dims[axis];
        let at = |j: Value| idx.iter().copied().chain(std::iter::once(j)).collect::<Vec<_>>();
        let start = if self.vector {
            kb.for_steps(zero, n, 4, |kb, j| self.element(kb, &ptrs, &at(j), Some(j), types::F32X4))
        } else {
            zero
        };
        kb.for_range(start, n, 1, |kb, j| self.element(kb, &ptrs, &at(j), Some(j), types::INVALID));
    }

    fn ptrs(&self, kb: &mut Kb, offs: &[Value]) -> Vec<Value> {
        self.views.iter().zip(offs).zip(&self.bases).map(|((v, &o), &b)| kb.elem_addr(b, o, v.dtype.size())).collect()
    }

    /// Computes and stores the element(s) at inner index `j` (vector when `vty` is F32X4).
    fn element(&self, kb: &mut Kb, ptrs: &[Value], idx: &[Value], j: Option<Value>, vty: Type) {
        let last = self.dims.len().saturating_sub(1);
        let addr = |kb: &mut Kb, v: usize| -> Value {
            match j {
                None => ptrs[v],
                Some(j) => {
                    let s = self.strides[v][last];
                    let e = kb.fb.ins().imul(j, s);
                    kb.elem_addr(ptrs[v], e, self.views[v].dtype.size())
                }
            }
        };
        let mut loads = Vec::with_capacity(self.k.inputs.len());
        for (i, view) in self.k.inputs.iter().enumerate() {
            let a = addr(kb, i + 1);
            let v = if vty == types::F32X4 {
                if view.strides[last].as_fixed() == Some(0) {
                    let s = kb.fb.ins().load(types::F32, mem(), a, 0);
                    kb.fb.ins().splat(types::F32X4, s)
                } else {
                    kb.fb.ins().load(types::F32X4, mem(), a, 0)
                }
            } else {
                load_elem(kb, view.dtype, a, 0)
            };
            loads.push(v);
        }
        let v = eval(kb, &self.k.expr, &self.k.inputs, &loads, idx, vty);
        let a = addr(kb, 0);
        if vty == types::F32X4 {
            kb.fb.ins().store(mem(), v, a, 0);
        } else {
            store_elem(kb, self.k.out.dtype, v, a, 0);
        }
    }
}

/// Evaluates `e` (vector when `vty` is F32X4, else in each node's compute type).
pub fn eval(kb: &mut Kb, e: &Expr, inputs: &[View], loads: &[Value], idx: &[Value], vty: Type) -> Value {
    let vector = vty == types::F32X4;
    let float_ty = |dt: DType| if vector { types::F32X4 } else { compute_type(dt) };
    match e {
        Expr::In(i) => loads[*i],
        Expr::F(v, dt) => Fm::new(kb, float_ty(*dt)).c(*v),
        Expr::I(v, dt) => kb.fb.ins().iconst(compute_type(*dt), *v),
        Expr::Index(a) => idx[*a],
        Expr::Un(op, a) => {
            let dt = a.dtype(inputs);
            let x = eval(kb, a, inputs, loads, idx, vty);
            if dt.is_float() {
                unary_float(kb, op, x, float_ty(dt))
            } else {
                unary_int(kb, op, x, dt)
            }
        }
        Expr::Bin(op, a, b) => {
            let dt = a.dtype(inputs);
            let x = eval(kb, a, inputs, loads, idx, vty);
            let y = eval(kb, b, inputs, loads, idx, vty);
            if dt.is_float() {
                binary_float(kb, *op, x, y, float_ty(dt))
            } else {
                binary_int(kb, *op, x, y, dt)
            }
        }
        Expr::Min(a, b) | Expr::Max(a, b) => {
            let is_min = matches!(e, Expr::Min(..));
            let dt = a.dtype(inputs);
            let x = eval(kb, a, inputs, loads, idx, vty);
            let y = eval(kb, b, inputs, loads, idx, vty);
            match (dt.is_float(), is_min) {
                (true, true) => kb.fb.ins().fmin(x, y),
                (true, false) => kb.fb.ins().fmax(x, y),
                (false, true) => kb.fb.ins().smin(x, y),
                (false, false) => kb.fb.ins().smax(x, y),
            }
        }
        Expr::Select(c, a, b) => {
            let c = eval(kb, c, inputs, loads, idx, vty);
            let x = eval(kb, a, inputs, loads, idx, vty);
            let y = eval(kb, b, inputs, loads, idx, vty);
            kb.fb.ins().select(c, x, y)
        }
        Expr::Cast(a, to) => {
            let from = a.dtype(inputs);
            let x = eval(kb, a, inputs, loads, idx, vty);
            cast(kb, x, from, *to)
        }
    }
}

/// A comparison result (i8 0/1) as a bool compute value (i32).
fn bool_val(kb: &mut Kb, c: Value) -> Value {
    kb.fb.ins().uextend(types::I32, c)
}

fn unary_float(kb: &mut Kb, op: &UnaryOp, x: Value, ty: Type) -> Value {
    let mut m = Fm::new(kb, ty);
    match op {
        UnaryOp::Neg => m.neg(x),
        UnaryOp::Abs => m.abs(x),
        UnaryOp::Sqrt => m.kb.fb.ins().sqrt(x),
        UnaryOp::Reciprocal => {
            let one = m.c(1.0);
            m.div(one, x)
        }
        UnaryOp::Exp => m.exp(x),
        UnaryOp::Log => m.log(x),
        UnaryOp::Erf => m.erf(x),
        UnaryOp::Tanh => m.tanh(x),
        UnaryOp::Sigmoid => m.sigmoid(x),
        UnaryOp::Relu => {
            let z = m.c(0.0);
            let pos = m.cmp(FloatCC::GreaterThan, x, z);
            m.sel(pos, x, z)
        }
        UnaryOp::Floor => m.floor(x),
        UnaryOp::Ceil => m.ceil(x),
        UnaryOp::Round => m.round(x),
        UnaryOp::Sign => {
            let z = m.c(0.0);
            let one = m.c(1.0);
            let mone = m.c(-1.0);
            let pos = m.cmp(FloatCC::GreaterThan, x, z);
            let neg = m.cmp(FloatCC::LessThan, x, z);
            let r = m.sel(neg, mone, z);
            let r = m.sel(pos, one, r);
            let nan = m.cmp(FloatCC::Unordered, x, x);
            m.sel(nan, x, r)
        }
        UnaryOp::Sin => m.sin_cos(x, false),
        UnaryOp::Cos => m.sin_cos(x, true),
        UnaryOp::Softplus => {
            // log(1 + e^x), = x once e^x swamps the 1.
            let e = m.exp(x);
            let one = m.c(1.0);
            let s = m.add(one, e);
            let l = m.log(s);
            let thr = m.c(if ty.lane_type() == types::F64 { 40.0 } else { 20.0 });
            let big = m.cmp(FloatCC::GreaterThan, x, thr);
            m.sel(big, x, l)
        }
        UnaryOp::HardSwish => {
            let hs = hard_sigmoid(&mut m, x, 1.0 / 6.0, 0.5);
            m.mul(x, hs)
        }
        UnaryOp::HardSigmoid { alpha, beta } => hard_sigmoid(&mut m, x, *alpha as f64, *beta as f64),
        UnaryOp::LeakyRelu { alpha } => {
            let z = m.c(0.0);
            let a = m.c(*alpha as f64);
            let ax = m.mul(a, x);
            let neg = m.cmp(FloatCC::LessThan, x, z);
            m.sel(neg, ax, x)
        }
        UnaryOp::Elu { alpha } => {
            let z = m.c(0.0);
            let e = m.exp(x);
            let one = m.c(1.0);
            let em1 = m.sub(e, one);
            let a = m.c(*alpha as f64);
            let v = m.mul(a, em1);
            let neg = m.cmp(FloatCC::LessThan, x, z);
            m.sel(neg, v, x)
        }
        UnaryOp::Gelu { tanh_approx } => {
            let half = m.c(0.5);
            let one = m.c(1.0);
            let inner = if *tanh_approx {
                // tanh(sqrt(2/pi) * (x + 0.044715 x^3))
                let x2 = m.mul(x, x);
                let c = m.c(0.044715);
                let t = m.fma(c, x2, one);
                let t = m.mul(t, x);
                let k = m.c((2.0 / std::f64::consts::PI).sqrt());
                let t = m.mul(t, k);
                m.tanh(t)
            } else {
                let k = m.c(std::f64::consts::FRAC_1_SQRT_2);
                let t = m.mul(x, k);
                m.erf(t)
            };
            let s = m.add(one, inner);
            let hx = m.mul(half, x);
            m.mul(hx, s)
        }
        UnaryOp::IsNaN => {
            let c = m.cmp(FloatCC::Unordered, x, x);
            bool_val(kb, c)
        }
        UnaryOp::IsInf { detect_negative, detect_positive } => {
            let inf = m.c(f64::INFINITY);
            let ninf = m.c(f64::NEG_INFINITY);
            let p = m.cmp(FloatCC::Equal, x, inf);
            let n = m.cmp(FloatCC::Equal, x, ninf);
            let c = match (detect_positive, detect_negative) {
                (true, true) => m.or_mask(p, n),
                (true, false) => p,
                (false, true) => n,
                (false, false) => m.kb.fb.ins().iconst(types::I8, 0),
            };
            bool_val(kb, c)
        }
        UnaryOp::Not => unreachable!("Not is a bool op"),
    }
}

fn hard_sigmoid(m: &mut Fm, x: Value, alpha: f64, beta: f64) -> Value {
    let a = m.c(alpha);
    let b = m.c(beta);
    let v = m.fma(a, x, b);
    let z = m.c(0.0);
    let one = m.c(1.0);
    let v = m.max(v, z);
    m.min(v, one)
}

fn unary_int(kb: &mut Kb, op: &UnaryOp, x: Value, dt: DType) -> Value {
    let ins = kb.fb.ins();
    match op {
        UnaryOp::Neg => {
            let n = ins.ineg(x);
            wrap_small(kb, n, dt)
        }
        UnaryOp::Abs => {
            let a = ins.iabs(x);
            wrap_small(kb, a, dt)
        }
        UnaryOp::Not => ins.bxor_imm_s(x, 1),
        UnaryOp::Relu => {
            let z = ins.iconst(compute_type(dt), 0);
            kb.fb.ins().smax(x, z)
        }
        UnaryOp::Sign => {
            let ty = compute_type(dt);
            let z = ins.iconst(ty, 0);
            let gt = kb.fb.ins().icmp(IntCC::SignedGreaterThan, x, z);
            let lt = kb.fb.ins().icmp(IntCC::SignedLessThan, x, z);
            let gt = kb.fb.ins().uextend(ty, gt);
            let lt = kb.fb.ins().uextend(ty, lt);
            kb.fb.ins().isub(gt, lt)
        }
        // Everything else is float-only (the importer's type checks guarantee it).
        _ => x,
    }
}

/// Re-wraps an i32 compute value to the range of an 8-bit dtype after arithmetic.
fn wrap_small(kb: &mut Kb, v: Value, dt: DType) -> Value {
    match dt {
        DType::I8 => {
            let r = kb.fb.ins().ireduce(types::I8, v);
            kb.fb.ins().sextend(types::I32, r)
        }
        DType::U8 | DType::Bool => kb.fb.ins().band_imm_s(v, 0xff),
        _ => v,
    }
}

fn binary_float(kb: &mut Kb, op: BinaryOp, x: Value, y: Value, ty: Type) -> Value {
    let mut m = Fm::new(kb, ty);
    let cmp = |m: &mut Fm, cc: FloatCC| {
        let c = m.cmp(cc, x, y);
        m.kb.fb.ins().uextend(types::I32, c)
    };
    match op {
        BinaryOp::Add => m.add(x, y),
        BinaryOp::Sub => m.sub(x, y),
        BinaryOp::Mul => m.mul(x, y),
        BinaryOp::Div => m.div(x, y),
        BinaryOp::Pow => m.pow(x, y),
        BinaryOp::Mod { fmod } => {
            // fmod: x - trunc(x/y)*y (x itself when y is infinite); fmod=0 then moves the result
            // to the divisor's sign, like Python's %.
            let q = m.div(x, y);
            let t = m.trunc(q);
            let p = m.mul(t, y);
            let r = m.sub(x, p);
            let ay = m.abs(y);
            let inf = m.c(f64::INFINITY);
            let y_inf = m.cmp(FloatCC::Equal, ay, inf);
            let r = m.sel(y_inf, x, r);
            if fmod {
                r
            } else {
                let z = m.c(0.0);
                let nz = m.cmp(FloatCC::NotEqual, r, z);
                let rn = m.cmp(FloatCC::LessThan, r, z);
                let yn = m.cmp(FloatCC::LessThan, y, z);
                let differ = m.kb.fb.ins().bxor(rn, yn);
                let fix = m.and_mask(nz, differ);
                let ry = m.add(r, y);
                m.sel(fix, ry, r)
            }
        }
        BinaryOp::Equal => cmp(&mut m, FloatCC::Equal),
        BinaryOp::Less => cmp(&mut m, FloatCC::LessThan),
        BinaryOp::LessOrEqual => cmp(&mut m, FloatCC::LessThanOrEqual),
        BinaryOp::Greater => cmp(&mut m, FloatCC::GreaterThan),
        BinaryOp::GreaterOrEqual => cmp(&mut m, FloatCC::GreaterThanOrEqual),
        BinaryOp::And | BinaryOp::Or | BinaryOp::Xor => unreachable!("logical ops take bools"),
    }
}

fn binary_int(kb: &mut Kb, op: BinaryOp, x: Value, y: Value, dt: DType) -> Value {
    let ty = compute_type(dt);
    let cmp = |kb: &mut Kb, cc: IntCC| {
        let c = kb.fb.ins().icmp(cc, x, y);
        kb.fb.ins().uextend(types::I32, c)
    };
    let r = match op {
        BinaryOp::Add => kb.fb.ins().iadd(x, y),
        BinaryOp::Sub => kb.fb.ins().isub(x, y),
        BinaryOp::Mul => kb.fb.ins().imul(x, y),
        BinaryOp::Div | BinaryOp::Mod { .. } => {
            // Hardware division traps on 0 and on MIN / -1: divide by a safe divisor and patch
            // those cases (x/0 gives 0, MIN/-1 wraps to MIN, x%-1 is 0).
            let zero = kb.fb.ins().iconst(ty, 0);
            let one = kb.fb.ins().iconst(ty, 1);
            let is_zero = kb.fb.ins().icmp(IntCC::Equal, y, zero);
            let mone = kb.fb.ins().iconst(ty, -1);
            let is_m1 = kb.fb.ins().icmp(IntCC::Equal, y, mone);
            let bad = kb.fb.ins().bor(is_zero, is_m1);
            let safe = kb.fb.ins().select(bad, one, y);
            match op {
                BinaryOp::Div => {
                    let q = kb.fb.ins().sdiv(x, safe);
                    let nx = kb.fb.ins().ineg(x);
                    let q = kb.fb.ins().select(is_m1, nx, q);
                    kb.fb.ins().select(is_zero, zero, q)
                }
                BinaryOp::Mod { fmod } => {
                    let r = kb.fb.ins().srem(x, safe);
                    let r = kb.fb.ins().select(bad, zero, r);
                    if fmod {
                        r
                    } else {
                        // Python-style: the result takes the divisor's sign.
                        let rz = kb.fb.ins().icmp(IntCC::NotEqual, r, zero);
                        let rn = kb.fb.ins().icmp(IntCC::SignedLessThan, r, zero);
                        let yn = kb.fb.ins().icmp(IntCC::SignedLessThan, y, zero);
                        let differ = kb.fb.ins().bxor(rn, yn);
                        let fix = kb.fb.ins().band(rz, differ);
                        let ry = kb.fb.ins().iadd(r, y);
                        kb.fb.ins().select(fix, ry, r)
                    }
                }
                _ => unreachable!(),
            }
        }
        BinaryOp::Pow => {
            let fx = kb.fb.ins().fcvt_from_sint(types::F64, x);
            let fy = kb.fb.ins().fcvt_from_sint(types::F64, y);
            let p = Fm::new(kb, types::F64).pow(fx, fy);
            let p = Fm::new(kb, types::F64).round(p);
            kb.fb.ins().fcvt_to_sint_sat(ty, p)
        }
        BinaryOp::Equal => return cmp(kb, IntCC::Equal),
        BinaryOp::Less => return cmp(kb, IntCC::SignedLessThan),
        BinaryOp::LessOrEqual => return cmp(kb, IntCC::SignedLessThanOrEqual),
        BinaryOp::Greater => return cmp(kb, IntCC::SignedGreaterThan),
        BinaryOp::GreaterOrEqual => return cmp(kb, IntCC::SignedGreaterThanOrEqual),
        BinaryOp::And => return kb.fb.ins().band(x, y),
        BinaryOp::Or => return kb.fb.ins().bor(x, y),
        BinaryOp::Xor => return kb.fb.ins().bxor(x, y),
    };
    wrap_small(kb, r, dt)
}

/// Converts a compute value of dtype `from` to dtype `to`, as the reference interpreter does
/// (floats saturate into integers, NaN gives 0; i64 wraps into narrower ints, other ints saturate).
pub fn cast(kb: &mut Kb, x: Value, from: DType, to: DType) -> Value {
    if from == to {
        return x;
    }
    let tty = compute_type(to);
    if to == DType::Bool {
        let c = if from.is_float() {
            let z = Fm::new(kb, compute_type(from)).c(0.0);
            kb.fb.ins().fcmp(FloatCC::NotEqual, x, z)
        } else {
            kb.fb.ins().icmp_imm_s(IntCC::NotEqual, x, 0)
        };
        return bool_val(kb, c);
    }
    if from.is_float() {
        if to.is_float() {
            return if to == DType::F64 { kb.fb.ins().fpromote(tty, x) } else { kb.fb.ins().fdemote(tty, x) };
        }
        let v = kb.fb.ins().fcvt_to_sint_sat(tty, x);
        return clamp_small(kb, v, to);
    }
    if to.is_float() {
        return kb.fb.ins().fcvt_from_sint(tty, x);
    }
    // int -> int
    let fty = compute_type(from);
    if from == DType::I64 {
        if tty == types::I32 {
            let r = kb.fb.ins().ireduce(types::I32, x);
            return wrap_small(kb, r, to);
        }
        return x;
    }
    if to == DType::I64 {
        return kb.fb.ins().sextend(types::I64, x);
    }
    debug_assert_eq!(fty, types::I32);
    clamp_small(kb, x, to)
}

fn clamp_small(kb: &mut Kb, v: Value, to: DType) -> Value {
    let (lo, hi) = match to {
        DType::I8 => (-128, 127),
        DType::U8 => (0, 255),
        _ => return v,
    };
    let l = kb.fb.ins().iconst(types::I32, lo);
    let h = kb.fb.ins().iconst(types::I32, hi);
    let v = kb.fb.ins().smax(v, l);
    kb.fb.ins().smin(v, h)
}

//! Row kernels: reductions over axes (ReduceX, ArgMax/ArgMin), and ops that reduce then rewrite a
//! row (Softmax, LogSoftmax, LayerNormalization), plus the CumSum scan. The outer axes are a loop
//! nest; a row is walked with its element stride, on f32x4 vectors when it is contiguous f32.

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, InstBuilder, Type, Value};

use super::emit::{mem, Kb, Loc};
use super::map::{cast, compute_type, load_elem, store_elem};
use super::math::Fm;
use crate::ir::{DType, Dim, ReduceKind};

/// A set of outer axes plus one row axis, for an input and an output view.
#[derive(Clone, Debug)]
pub struct Rows {
    pub outer: Vec<Dim>,
    /// Per view (input, output, extra...): element stride per outer axis.
    pub outer_strides: Vec<Vec<Dim>>,
    pub len: Dim,
    /// Per view: element stride along the row (0 for an output that receives one value per row).
    pub row_strides: Vec<Dim>,
    pub locs: Vec<Loc>,
    pub dtypes: Vec<DType>,
    /// A row over several axes that are not one stride apart: their sizes and, per view, strides.
    /// `len` is then their product and `row_strides` is unused.
    pub multi: Option<(Vec<Dim>, Vec<Vec<Dim>>)>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Acc {
    Add,
    Mul,
    Max,
    Min,
}

struct RowCtx {
    len: Value,
    /// Per view: element pointer of this row and its byte stride.
    ptrs: Vec<Value>,
    byte_strides: Vec<Value>,
    contiguous: Vec<bool>,
    /// Multi-axis rows: axis sizes and per-view byte strides per axis.
    multi: Option<(Vec<Value>, Vec<Vec<Value>>)>,
}

fn for_each_row(kb: &mut Kb, rows: &Rows, body: &mut dyn FnMut(&mut Kb, &RowCtx)) {
    let dims: Vec<Value> = rows.outer.iter().map(|d| kb.dim(d)).collect();
    let strides: Vec<Vec<Value>> = rows.outer_strides.iter().map(|s| s.iter().map(|d| kb.dim(d)).collect()).collect();
    let len = kb.dim(&rows.len);
    let bases: Vec<Value> = rows.locs.iter().map(|&l| kb.base(l)).collect();
    let byte_strides: Vec<Value> = rows
        .row_strides
        .iter()
        .zip(&rows.dtypes)
        .map(|(s, dt)| {
            let v = kb.dim(s);
            kb.fb.ins().imul_imm_s(v, dt.size() as i64)
        })
        .collect();
    let mut contiguous: Vec<bool> = rows.row_strides.iter().map(|s| s.as_fixed() == Some(1)).collect();
    let multi = rows.multi.as_ref().map(|(dims, strides)| {
        contiguous.iter_mut().for_each(|c| *c = false);
        let dims: Vec<Value> = dims.iter().map(|d| kb.dim(d)).collect();
        let strides: Vec<Vec<Value>> = strides
            .iter()
            .zip(&rows.dtypes)
            .map(|(s, dt)| {
                s.iter()
                    .map(|d| {
                        let v = kb.dim(d);
                        kb.fb.ins().imul_imm_s(v, dt.size() as i64)
                    })
                    .collect()
            })
            .collect();
        (dims, strides)
    });
    let zero = kb.iconst(0);
    let offs = vec![zero; rows.locs.len()];
    let dtypes = rows.dtypes.clone();
    kb.loop_nest(&dims, &strides, offs, &mut Vec::new(), &mut |kb, offs, _| {
        let ptrs: Vec<Value> =
            offs.iter().zip(&bases).zip(&dtypes).map(|((&o, &b), dt)| kb.elem_addr(b, o, dt.size())).collect();
        let rc = RowCtx {
            len,
            ptrs,
            byte_strides: byte_strides.clone(),
            contiguous: contiguous.clone(),
            multi: multi.clone(),
        };
        body(kb, &rc);
    });
}

/// Folds `f(element)` over a float row with `acc`; vectorised when `vector`. `f` gets the element
/// value(s), its index and the lane type, and may store.
fn fold_row(
    kb: &mut Kb,
    len: Value,
    ty: Type,
    vector: bool,
    acc: Acc,
    init: f64,
    f: &mut dyn FnMut(&mut Kb, Value, Type) -> Value,
) -> Value {
    let zero = kb.iconst(0);
    let combine = |kb: &mut Kb, a: Value, b: Value| match acc {
        Acc::Add => kb.fb.ins().fadd(a, b),
        Acc::Mul => kb.fb.ins().fmul(a, b),
        Acc::Max => kb.fb.ins().fmax(a, b),
        Acc::Min => kb.fb.ins().fmin(a, b),
    };
    let mut start = zero;
    let mut acc_s = Fm::new(kb, ty).c(init);
    if vector {
        let init_v = Fm::new(kb, types::F32X4).c(init);
        let (end, accs) = kb.fold_range(zero, len, 4, &[init_v], |kb, j, a| {
            let v = f(kb, j, types::F32X4);
            vec![combine(kb, a[0], v)]
        });
        start = end;
        for lane in 0..4u8 {
            let l = kb.fb.ins().extractlane(accs[0], lane);
            acc_s = combine(kb, acc_s, l);
        }
    }
    let (_, r) = kb.fold_range(start, len, 1, &[acc_s], |kb, j, a| {
        let v = f(kb, j, ty);
        vec![combine(kb, a[0], v)]
    });
    r[0]
}

/// Address of element `j` of view `v` in this row.
fn at(kb: &mut Kb, rc: &RowCtx, v: usize, j: Value) -> Value {
    if let Some((dims, strides)) = &rc.multi {
        // Split the flat row index into per-axis indices, innermost axis last.
        let mut rest = j;
        let mut off = kb.iconst(0);
        for (d, s) in dims.iter().zip(&strides[v]).rev() {
            let q = kb.fb.ins().udiv(rest, *d);
            let qd = kb.fb.ins().imul(q, *d);
            let i = kb.fb.ins().isub(rest, qd);
            let t = kb.fb.ins().imul(i, *s);
            off = kb.fb.ins().iadd(off, t);
            rest = q;
        }
        return kb.fb.ins().iadd(rc.ptrs[v], off);
    }
    let off = kb.fb.ins().imul(j, rc.byte_strides[v]);
    kb.fb.ins().iadd(rc.ptrs[v], off)
}

fn load_lane(kb: &mut Kb, dt: DType, addr: Value, lty: Type) -> Value {
    if lty == types::F32X4 {
        kb.fb.ins().load(types::F32X4, mem(), addr, 0)
    } else {
        load_elem(kb, dt, addr, 0)
    }
}

/// ReduceX over the row (views: input, output with row stride 0).
pub fn emit_reduce(kb: &mut Kb, rows: &Rows, kind: ReduceKind) {
    let (dt, odt) = (rows.dtypes[0], rows.dtypes[1]);
    let vector =
        kb.target.simd() && dt == DType::F32 && rows.multi.is_none() && rows.row_strides[0].as_fixed() == Some(1);
    for_each_row(kb, rows, &mut |kb, rc| {
        let result = if dt.is_float() {
            let ty = compute_type(dt);
            let (acc, init) = match kind {
                ReduceKind::Sum | ReduceKind::Mean | ReduceKind::SumSquare | ReduceKind::L2 => (Acc::Add, 0.0),
                ReduceKind::Prod => (Acc::Mul, 1.0),
                ReduceKind::Max => (Acc::Max, f64::NEG_INFINITY),
                ReduceKind::Min => (Acc::Min, f64::INFINITY),
            };
            let square = matches!(kind, ReduceKind::SumSquare | ReduceKind::L2);
            let r = fold_row(kb, rc.len, ty, vector && rc.contiguous[0], acc, init, &mut |kb, j, lty| {
                let a = at(kb, rc, 0, j);
                let x = load_lane(kb, dt, a, lty);
                if square {
                    kb.fb.ins().fmul(x, x)
                } else {
                    x
                }
            });
            match kind {
                ReduceKind::Mean => {
                    let n = kb.fb.ins().fcvt_from_sint(ty, rc.len);
                    kb.fb.ins().fdiv(r, n)
                }
                ReduceKind::L2 => kb.fb.ins().sqrt(r),
                _ => r,
            }
        } else {
            // Integers accumulate in i64, like the reference.
            let init = match kind {
                ReduceKind::Prod => 1,
                ReduceKind::Max => i64::MIN,
                ReduceKind::Min => i64::MAX,
                _ => 0,
            };
            let init = match (kind, dt) {
                (ReduceKind::Max, DType::I32) => i32::MIN as i64,
                (ReduceKind::Min, DType::I32) => i32::MAX as i64,
                (ReduceKind::Max, DType::I8) => -128,
                (ReduceKind::Min, DType::I8) => 127,
                (ReduceKind::Max, DType::U8 | DType::Bool) => 0,
                (ReduceKind::Min, DType::U8 | DType::Bool) => 255,
                _ => init,
            };
            let zero = kb.iconst(0);
            let i0 = kb.iconst(init);
            let (_, r) = kb.fold_range(zero, rc.len, 1, &[i0], |kb, j, a| {
                let p = at(kb, rc, 0, j);
                let x = load_elem(kb, dt, p, 0);
                let x = cast(kb, x, dt, DType::I64);
                vec![match kind {
                    ReduceKind::Sum | ReduceKind::Mean => kb.fb.ins().iadd(a[0], x),
                    ReduceKind::SumSquare | ReduceKind::L2 => {
                        let s = kb.fb.ins().imul(x, x);
                        kb.fb.ins().iadd(a[0], s)
                    }
                    ReduceKind::Prod => kb.fb.ins().imul(a[0], x),
                    ReduceKind::Max => kb.fb.ins().smax(a[0], x),
                    ReduceKind::Min => kb.fb.ins().smin(a[0], x),
                }]
            });
            let r = r[0];
            let r = match kind {
                ReduceKind::Mean => {
                    let one = kb.iconst(1);
                    let n = kb.fb.ins().smax(rc.len, one);
                    kb.fb.ins().sdiv(r, n)
                }
                ReduceKind::L2 => {
                    let f = kb.fb.ins().fcvt_from_sint(types::F64, r);
                    let s = kb.fb.ins().sqrt(f);
                    kb.fb.ins().fcvt_to_sint_sat(types::I64, s)
                }
                _ => r,
            };
            cast(kb, r, DType::I64, odt)
        };
        store_elem(kb, odt, result, rc.ptrs[1], 0);
    });
}

/// Softmax / LogSoftmax along the row (views: input, output with the same row stride).
pub fn emit_softmax(kb: &mut Kb, rows: &Rows, log: bool) {
    let dt = rows.dtypes[0];
    let ty = compute_type(dt);
    let vector = kb.target.simd() && dt == DType::F32;
    for_each_row(kb, rows, &mut |kb, rc| {
        let vec = vector && rc.contiguous[0] && rc.contiguous[1];
        let m = fold_row(kb, rc.len, ty, vec, Acc::Max, f64::NEG_INFINITY, &mut |kb, j, lty| {
            let a = at(kb, rc, 0, j);
            load_lane(kb, dt, a, lty)
        });
        // e = exp(x - max) is stored into the output and summed.
        let s = fold_row(kb, rc.len, ty, vec, Acc::Add, 0.0, &mut |kb, j, lty| {
            let a = at(kb, rc, 0, j);
            let x = load_lane(kb, dt, a, lty);
            let mv = if lty.is_vector() { kb.fb.ins().splat(lty, m) } else { m };
            let d = kb.fb.ins().fsub(x, mv);
            let e = Fm::new(kb, lty).exp(d);
            let o = at(kb, rc, 1, j);
            kb.fb.ins().store(mem(), if log { d } else { e }, o, 0);
            e
        });
        let k = if log { Fm::new(kb, ty).log(s) } else { Fm::new(kb, ty).c(1.0) };
        let k = if log { k } else { kb.fb.ins().fdiv(k, s) };
        fold_row(kb, rc.len, ty, vec, Acc::Add, 0.0, &mut |kb, j, lty| {
            let o = at(kb, rc, 1, j);
            let v = load_lane(kb, dt, o, lty);
            let kv = if lty.is_vector() { kb.fb.ins().splat(lty, k) } else { k };
            let r = if log { kb.fb.ins().fsub(v, kv) } else { kb.fb.ins().fmul(v, kv) };
            kb.fb.ins().store(mem(), r, o, 0);
            r
        });
    });
}

/// LayerNormalization over a contiguous row. Views: x, y, scale, bias (optional), mean and
/// inv_std outputs (optional, row stride 0). Scale and bias have row stride 1 or 0.
pub fn emit_layer_norm(kb: &mut Kb, rows: &Rows, eps: f32, has_bias: bool, stats: (Option<usize>, Option<usize>)) {
    let dt = rows.dtypes[0];
    let ty = compute_type(dt);
    let vector = kb.target.simd() && dt == DType::F32;
    for_each_row(kb, rows, &mut |kb, rc| {
        let vec = vector && rc.contiguous.iter().take(if has_bias { 4 } else { 3 }).all(|&c| c);
        let s = fold_row(kb, rc.len, ty, vec, Acc::Add, 0.0, &mut |kb, j, lty| {
            let a = at(kb, rc, 0, j);
            load_lane(kb, dt, a, lty)
        });
        let n = kb.fb.ins().fcvt_from_sint(ty, rc.len);
        let mean = kb.fb.ins().fdiv(s, n);
        let ss = fold_row(kb, rc.len, ty, vec, Acc::Add, 0.0, &mut |kb, j, lty| {
            let a = at(kb, rc, 0, j);
            let x = load_lane(kb, dt, a, lty);
            let mv = if lty.is_vector() { kb.fb.ins().splat(lty, mean) } else { mean };
            let d = kb.fb.ins().fsub(x, mv);
            kb.fb.ins().fmul(d, d)
        });
        let var = kb.fb.ins().fdiv(ss, n);
        let e = Fm::new(kb, ty).c(eps as f64);
        let ve = kb.fb.ins().fadd(var, e);
        let sd = kb.fb.ins().sqrt(ve);
        let one = Fm::new(kb, ty).c(1.0);
        let rstd = kb.fb.ins().fdiv(one, sd);
        fold_row(kb, rc.len, ty, vec, Acc::Add, 0.0, &mut |kb, j, lty| {
            let a = at(kb, rc, 0, j);
            let x = load_lane(kb, dt, a, lty);
            let splat = |kb: &mut Kb, v: Value| if lty.is_vector() { kb.fb.ins().splat(lty, v) } else { v };
            let mv = splat(kb, mean);
            let rv = splat(kb, rstd);
            let d = kb.fb.ins().fsub(x, mv);
            let nrm = kb.fb.ins().fmul(d, rv);
            let sa = at(kb, rc, 2, j);
            let sc = load_lane(kb, dt, sa, lty);
            let mut y = kb.fb.ins().fmul(nrm, sc);
            if has_bias {
                let ba = at(kb, rc, 3, j);
                let b = load_lane(kb, dt, ba, lty);
                y = kb.fb.ins().fadd(y, b);
            }
            let o = at(kb, rc, 1, j);
            kb.fb.ins().store(mem(), y, o, 0);
            y
        });
        if let Some(v) = stats.0 {
            kb.fb.ins().store(mem(), mean, rc.ptrs[v], 0);
        }
        if let Some(v) = stats.1 {
            kb.fb.ins().store(mem(), rstd, rc.ptrs[v], 0);
        }
    });
}

/// ArgMax / ArgMin along the row (views: input, i64 output with row stride 0). The first index wins
/// ties unless `last`; NaN counts as the extreme, like the reference.
pub fn emit_arg_reduce(kb: &mut Kb, rows: &Rows, max: bool, last: bool) {
    let dt = rows.dtypes[0];
    for_each_row(kb, rows, &mut |kb, rc| {
        let p0 = rc.ptrs[0];
        let first = load_elem(kb, dt, p0, 0);
        let one = kb.iconst(1);
        let zero = kb.iconst(0);
        let (_, r) = kb.fold_range(one, rc.len, 1, &[first, zero], |kb, j, a| {
            let p = at(kb, rc, 0, j);
            let x = load_elem(kb, dt, p, 0);
            let better = if dt.is_float() {
                let cc = match (max, last) {
                    (true, false) => FloatCC::GreaterThan,
                    (true, true) => FloatCC::GreaterThanOrEqual,
                    (false, false) => FloatCC::LessThan,
                    (false, true) => FloatCC::LessThanOrEqual,
                };
                let b = kb.fb.ins().fcmp(cc, x, a[0]);
                // A NaN wins once and then stays.
                let xn = kb.fb.ins().fcmp(FloatCC::Unordered, x, x);
                let an = kb.fb.ins().fcmp(FloatCC::Unordered, a[0], a[0]);
                let nb = kb.fb.ins().bor(b, xn);
                let keep = if last { kb.fb.ins().iconst(types::I8, 0) } else { an };
                let nk = kb.fb.ins().bnot(keep);
                let nk = kb.fb.ins().band_imm_s(nk, 1);
                kb.fb.ins().band(nb, nk)
            } else {
                let cc = match (max, last) {
                    (true, false) => IntCC::SignedGreaterThan,
                    (true, true) => IntCC::SignedGreaterThanOrEqual,
                    (false, false) => IntCC::SignedLessThan,
                    (false, true) => IntCC::SignedLessThanOrEqual,
                };
                kb.fb.ins().icmp(cc, x, a[0])
            };
            let v = kb.fb.ins().select(better, x, a[0]);
            let i = kb.fb.ins().select(better, j, a[1]);
            vec![v, i]
        });
        kb.fb.ins().store(mem(), r[1], rc.ptrs[1], 0);
    });
}

/// CumSum along the row (views: input, output with the same shape).
pub fn emit_cumsum(kb: &mut Kb, rows: &Rows, exclusive: bool, reverse: bool) {
    let dt = rows.dtypes[0];
    let ty = compute_type(dt);
    for_each_row(kb, rows, &mut |kb, rc| {
        let zero = kb.iconst(0);
        let init = if dt.is_float() { Fm::new(kb, ty).c(0.0) } else { kb.fb.ins().iconst(ty, 0) };
        kb.fold_range(zero, rc.len, 1, &[init], |kb, j, a| {
            let j = if reverse {
                let l1 = kb.fb.ins().iadd_imm_s(rc.len, -1);
                kb.fb.ins().isub(l1, j)
            } else {
                j
            };
            let p = at(kb, rc, 0, j);
            let x = load_elem(kb, dt, p, 0);
            let s = if dt.is_float() { kb.fb.ins().fadd(a[0], x) } else { kb.fb.ins().iadd(a[0], x) };
            let o = at(kb, rc, 1, j);
            store_elem(kb, dt, if exclusive { a[0] } else { s }, o, 0);
            vec![s]
        });
    });
}

/// RMSNormalization over a contiguous row. Views: x, y, scale (row stride 1 or 0).
pub fn emit_rms_norm(kb: &mut Kb, rows: &Rows, eps: f32) {
    let dt = rows.dtypes[0];
    let ty = compute_type(dt);
    let vector = kb.target.simd() && dt == DType::F32;
    for_each_row(kb, rows, &mut |kb, rc| {
        let vec = vector && rc.contiguous.iter().take(3).all(|&c| c);
        let ss = fold_row(kb, rc.len, ty, vec, Acc::Add, 0.0, &mut |kb, j, lty| {
            let a = at(kb, rc, 0, j);
            let x = load_lane(kb, dt, a, lty);
            kb.fb.ins().fmul(x, x)
        });
        let n = kb.fb.ins().fcvt_from_sint(ty, rc.len);
        let ms = kb.fb.ins().fdiv(ss, n);
        let e = Fm::new(kb, ty).c(eps as f64);
        let me = kb.fb.ins().fadd(ms, e);
        let rms = kb.fb.ins().sqrt(me);
        let one = Fm::new(kb, ty).c(1.0);
        let inv = kb.fb.ins().fdiv(one, rms);
        fold_row(kb, rc.len, ty, vec, Acc::Add, 0.0, &mut |kb, j, lty| {
            let a = at(kb, rc, 0, j);
            let x = load_lane(kb, dt, a, lty);
            let iv = if lty.is_vector() { kb.fb.ins().splat(lty, inv) } else { inv };
            let nrm = kb.fb.ins().fmul(x, iv);
            let sa = at(kb, rc, 2, j);
            let sc = load_lane(kb, dt, sa, lty);
            let y = kb.fb.ins().fmul(nrm, sc);
            let o = at(kb, rc, 1, j);
            kb.fb.ins().store(mem(), y, o, 0);
            y
        });
    });
}

//! Matrix multiplication: out[b, m, n] = sum_k A[b, m, k] * B[b, k, n], with any element strides
//! for A and B and broadcast batch axes.
//!
//! f32 with a unit-stride B row uses a register-blocked micro-kernel: a tile of `MR` rows by
//! `NV` f32x4 vectors stays in registers across the whole k loop (A broadcast per row, one B load
//! per vector, one fma per accumulator); edges fall back to narrower tiles, then to scalar columns.
//! Other dtypes and targets without vectors use scalar tiles of four columns.

use cranelift_codegen::ir::{types, InstBuilder, Type, Value};

use super::emit::{mem, Kb, Loc};
use super::map::{cast, compute_type, load_elem, store_elem};
use super::math::Fm;
use crate::ir::{DType, Dim};

#[derive(Clone, Debug)]
pub struct Operand {
    pub loc: Loc,
    pub dtype: DType,
    /// Element stride per batch axis.
    pub batch_strides: Vec<Dim>,
    /// Element strides along the two matrix axes (A: m, k; B: k, n; out: m, n).
    pub strides: [Dim; 2],
}

#[derive(Clone, Debug)]
pub struct MatMulKernel {
    pub batch: Vec<Dim>,
    pub m: Dim,
    pub k: Dim,
    pub n: Dim,
    pub a: Operand,
    pub b: Operand,
    pub out: Operand,
    /// MatMulInteger zero points: (operand, stride along m for A / n for B), scalar when 0.
    pub a_zero: Option<(Loc, DType, Dim)>,
    pub b_zero: Option<(Loc, DType, Dim)>,
}

/// Rows per register tile and f32x4 vectors per row.
pub const MR: usize = 4;
pub const NV: usize = 2;

struct Ptrs {
    a: Value,
    b: Value,
    out: Value,
    /// Byte strides: A m, A k, B k, B n, out m, out n.
    s: [Value; 6],
    k: Value,
    azp: Option<(Value, Value)>,
    bzp: Option<(Value, Value)>,
}

pub fn emit_matmul(kb: &mut Kb, mm: &MatMulKernel) {
    let batch: Vec<Value> = mm.batch.iter().map(|d| kb.dim(d)).collect();
    let strides: Vec<Vec<Value>> =
        [&mm.a, &mm.b, &mm.out].iter().map(|o| o.batch_strides.iter().map(|d| kb.dim(d)).collect()).collect();
    let bases = [kb.base(mm.a.loc), kb.base(mm.b.loc), kb.base(mm.out.loc)];
    let m = kb.dim(&mm.m);
    let n = kb.dim(&mm.n);
    let k = kb.dim(&mm.k);
    let mut s = Vec::new();
    for o in [&mm.a, &mm.b, &mm.out] {
        for st in &o.strides {
            let v = kb.dim(st);
            s.push(kb.fb.ins().imul_imm_s(v, o.dtype.size() as i64));
        }
    }
    let s: [Value; 6] = s.try_into().unwrap();
    let zp = |kb: &mut Kb, z: &Option<(Loc, DType, Dim)>| {
        z.as_ref().map(|(loc, dt, st)| {
            let b = kb.base(*loc);
            let v = kb.dim(st);
            (b, kb.fb.ins().imul_imm_s(v, dt.size() as i64))
        })
    };
    let azp = zp(kb, &mm.a_zero);
    let bzp = zp(kb, &mm.b_zero);
    let zero = kb.iconst(0);
    let vector = kb.target.simd()
        && mm.a.dtype == DType::F32
        && mm.b.dtype == DType::F32
        && mm.b.strides[1].as_fixed() == Some(1)
        && mm.out.strides[1].as_fixed() == Some(1);
    let sizes = [mm.a.dtype.size(), mm.b.dtype.size(), mm.out.dtype.size()];
    kb.loop_nest(&batch, &strides, vec![zero; 3], &mut Vec::new(), &mut |kb, offs, _| {
        let p: Vec<Value> = (0..3).map(|i| kb.elem_addr(bases[i], offs[i], sizes[i])).collect();
        let ptrs = Ptrs { a: p[0], b: p[1], out: p[2], s, k, azp, bzp };
        let rows_end = if vector {
            kb.for_steps(zero, m, MR as i64, |kb, i| columns(kb, mm, &ptrs, i, MR, n, true))
        } else {
            zero
        };
        kb.for_range(rows_end, m, 1, |kb, i| columns(kb, mm, &ptrs, i, 1, n, vector));
    });
}

/// All column tiles of the row block starting at row `i`.
fn columns(kb: &mut Kb, mm: &MatMulKernel, p: &Ptrs, i: Value, rows: usize, n: Value, vector: bool) {
    let zero = kb.iconst(0);
    let mut start = zero;
    if vector {
        start = kb.for_steps(start, n, 4 * NV as i64, |kb, j| tile(kb, mm, p, i, j, rows, NV, true));
        start = kb.for_steps(start, n, 4, |kb, j| tile(kb, mm, p, i, j, rows, 1, true));
    } else {
        start = kb.for_steps(start, n, 4, |kb, j| tile(kb, mm, p, i, j, rows, 4, false));
    }
    kb.for_range(start, n, 1, |kb, j| tile(kb, mm, p, i, j, rows, 1, false));
}

/// One register tile: `rows` x `width` where width counts f32x4 vectors (`vector`) or scalars.
#[allow(clippy::too_many_arguments)]
fn tile(kb: &mut Kb, mm: &MatMulKernel, p: &Ptrs, i: Value, j: Value, rows: usize, width: usize, vector: bool) {
    let integer = mm.a_zero.is_some() || mm.b_zero.is_some() || !mm.out.dtype.is_float();
    let acc_ty: Type = if vector { types::F32X4 } else { compute_type(mm.out.dtype) };
    let zero_acc = if acc_ty.is_int() { kb.fb.ins().iconst(acc_ty, 0) } else { Fm::new(kb, acc_ty).c(0.0) };
    let init = vec![zero_acc; rows * width];
    // Row pointers into A, the column pointer into B.
    let a_rows: Vec<Value> = (0..rows)
        .map(|r| {
            let ir = kb.fb.ins().iadd_imm_s(i, r as i64);
            let off = kb.fb.ins().imul(ir, p.s[0]);
            kb.fb.ins().iadd(p.a, off)
        })
        .collect();
    let jb = kb.fb.ins().imul(j, p.s[3]);
    let b_col = kb.fb.ins().iadd(p.b, jb);
    let zero = kb.iconst(0);
    // Zero points (MatMulInteger): per row of A / per column of B, or scalar (stride 0).
    let a_zps: Vec<Option<Value>> = (0..rows)
        .map(|r| {
            p.azp.map(|(base, st)| {
                let ir = kb.fb.ins().iadd_imm_s(i, r as i64);
                let off = kb.fb.ins().imul(ir, st);
                let addr = kb.fb.ins().iadd(base, off);
                load_elem(kb, mm.a_zero.as_ref().unwrap().1, addr, 0)
            })
        })
        .collect();
    let b_zps: Vec<Option<Value>> = (0..width)
        .map(|c| {
            p.bzp.map(|(base, st)| {
                let jc = kb.fb.ins().iadd_imm_s(j, c as i64);
                let off = kb.fb.ins().imul(jc, st);
                let addr = kb.fb.ins().iadd(base, off);
                load_elem(kb, mm.b_zero.as_ref().unwrap().1, addr, 0)
            })
        })
        .collect();
    let (_, accs) = kb.fold_range(zero, p.k, 1, &init, |kb, kk, acc| {
        let ka = kb.fb.ins().imul(kk, p.s[1]);
        let kbo = kb.fb.ins().imul(kk, p.s[2]);
        let brow = kb.fb.ins().iadd(b_col, kbo);
        let bv: Vec<Value> = (0..width)
            .map(|c| {
                if vector {
                    kb.fb.ins().load(types::F32X4, mem(), brow, (c * 16) as i32)
                } else {
                    let off = kb.fb.ins().imul_imm_s(p.s[3], c as i64);
                    let addr = kb.fb.ins().iadd(brow, off);
                    let v = load_elem(kb, mm.b.dtype, addr, 0);
                    let v = if integer { cast(kb, v, mm.b.dtype, mm.out.dtype) } else { v };
                    match b_zps[c] {
                        Some(z) => {
                            let z = cast(kb, z, mm.b_zero.as_ref().unwrap().1, mm.out.dtype);
                            kb.fb.ins().isub(v, z)
                        }
                        None => v,
                    }
                }
            })
            .collect();
        let mut out = Vec::with_capacity(acc.len());
        for r in 0..rows {
            let addr = kb.fb.ins().iadd(a_rows[r], ka);
            let mut a = load_elem(kb, mm.a.dtype, addr, 0);
            if integer {
                a = cast(kb, a, mm.a.dtype, mm.out.dtype);
                if let Some(z) = a_zps[r] {
                    let z = cast(kb, z, mm.a_zero.as_ref().unwrap().1, mm.out.dtype);
                    a = kb.fb.ins().isub(a, z);
                }
            }
            let av = if vector { kb.fb.ins().splat(types::F32X4, a) } else { a };
            for c in 0..width {
                let prev = acc[r * width + c];
                out.push(if integer {
                    let t = kb.fb.ins().imul(av, bv[c]);
                    kb.fb.ins().iadd(prev, t)
                } else {
                    Fm::new(kb, acc_ty).fma(av, bv[c], prev)
                });
            }
        }
        out
    });
    for r in 0..rows {
        let ir = kb.fb.ins().iadd_imm_s(i, r as i64);
        let off = kb.fb.ins().imul(ir, p.s[4]);
        let row = kb.fb.ins().iadd(p.out, off);
        let jo = kb.fb.ins().imul(j, p.s[5]);
        let row = kb.fb.ins().iadd(row, jo);
        for c in 0..width {
            let v = accs[r * width + c];
            if vector {
                kb.fb.ins().store(mem(), v, row, (c * 16) as i32);
            } else {
                let off = kb.fb.ins().imul_imm_s(p.s[5], c as i64);
                let addr = kb.fb.ins().iadd(row, off);
                store_elem(kb, mm.out.dtype, v, addr, 0);
            }
        }
    }
}

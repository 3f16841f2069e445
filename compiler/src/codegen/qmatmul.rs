//! Matmul with a quantized weight: out[m, n] = sum_k A[m, k] * W[k, n], W read from its packed
//! 4- or 8-bit form (`layout::NBitsPacking`) and dequantized in registers, never materialised.
//!
//! Per 16-column panel and per block of K: the block's scales (and offsets) are loaded once, then
//! every k step loads one row of 8 or 16 bytes, widens it to f32x4 vectors, scales them and
//! multiply-adds them into a tile of accumulators (4 rows x 8 columns for prompts, 1 row x 16
//! columns for decoding). Targets without vectors run a scalar 1 x 16 tile over the same bytes.

use cranelift_codegen::ir::{types, InstBuilder, Value};

use super::emit::{mem, Kb};
use super::layout::{NBitsPacking, PANEL_COLS};
use super::math::Fm;
use super::matmul::{column_range, MatMulKernel};

struct Q<'m> {
    pk: &'m NBitsPacking,
    a: Value,
    b: Value,
    out: Value,
    /// Columns of the whole matrix (stores past it are skipped).
    n: Value,
    k: usize,
    split_fma: bool,
}

pub fn emit(kb: &mut Kb, mm: &MatMulKernel, pk: &NBitsPacking, units: Option<(Value, Value)>) {
    let q = Q {
        pk,
        a: kb.base(mm.a.loc),
        b: kb.base(mm.b.loc),
        out: kb.base(mm.out.loc),
        n: kb.iconst(pk.layout.n as i64),
        k: pk.layout.k,
        split_fma: kb.target.arch == edgec_runtime::Arch::X86_64 && kb.target.has("avx"),
    };
    let m = kb.dim(&mm.m);
    let (lo, hi) = column_range(kb, mm, units);
    let full_end = kb.fb.ins().band_imm_s(hi, !(PANEL_COLS as i64 - 1));
    let next = kb.for_steps(lo, full_end, PANEL_COLS as i64, |kb, j| panel(kb, &q, j, m, true));
    // The last panel of a matrix whose N is not a multiple of 16.
    let partial = kb.fb.ins().icmp(cranelift_codegen::ir::condcodes::IntCC::SignedLessThan, next, hi);
    kb.if_then(partial, |kb| panel(kb, &q, next, m, false));
}

/// Every row of the panel starting at column `j`.
fn panel(kb: &mut Kb, q: &Q, j: Value, m: Value, full: bool) {
    let idx = kb.fb.ins().ushr_imm_s(j, 4);
    let off = kb.fb.ins().imul_imm_s(idx, q.pk.panel_bytes() as i64);
    let pp = kb.fb.ins().iadd(q.b, off);
    let zero = kb.iconst(0);
    if !kb.target.simd() {
        kb.for_range(zero, m, 1, |kb, i| scalar_tile(kb, q, pp, i, j, full));
        return;
    }
    let end = kb.for_steps(zero, m, 4, |kb, i| {
        tile(kb, q, pp, i, j, 4, &[0], full);
        tile(kb, q, pp, i, j, 4, &[1], full);
    });
    kb.for_range(end, m, 1, |kb, i| tile(kb, q, pp, i, j, 1, &[0, 1], full));
}

/// A tile of `rows` rows and the 8-column `halves` of the panel at `pp` (column `j`).
#[allow(clippy::too_many_arguments)]
fn tile(kb: &mut Kb, q: &Q, pp: Value, i: Value, j: Value, rows: usize, halves: &[usize], full: bool) {
    let pk = q.pk;
    let row_bytes = (q.k * 4) as i64;
    let a_off = kb.fb.ins().imul_imm_s(i, row_bytes);
    let a_ptr = kb.fb.ins().iadd(q.a, a_off);
    let zero_v = Fm::new(kb, types::F32X4).c(0.0);
    let nacc = rows * halves.len() * 2;
    let mut state = vec![zero_v; nacc];
    state.extend([a_ptr, pp]);
    let bs = pk.layout.block_size;
    let (full_blocks, tail) = (q.k / bs, q.k % bs);
    let zero = kb.iconst(0);
    let nb = kb.iconst(full_blocks as i64);
    let (_, mut st) = kb.fold_range(zero, nb, 1, &state, |kb, _, st| {
        let mut out = block(kb, q, st, rows, halves, bs);
        let rec = out[nacc + 1];
        out[nacc + 1] = kb.fb.ins().iadd_imm_s(rec, pk.record_bytes() as i64);
        out
    });
    if tail > 0 {
        st = block(kb, q, &st, rows, halves, tail);
    }
    for r in 0..rows {
        let ir = kb.fb.ins().iadd_imm_s(i, r as i64);
        let off = kb.fb.ins().imul_imm_s(ir, (pk.layout.n * 4) as i64);
        let row = kb.fb.ins().iadd(q.out, off);
        let jo = kb.fb.ins().ishl_imm_s(j, 2);
        let row = kb.fb.ins().iadd(row, jo);
        for (hi, &h) in halves.iter().enumerate() {
            for v in 0..2 {
                let acc = st[(r * halves.len() + hi) * 2 + v];
                let col = h * 8 + v * 4;
                if full {
                    kb.fb.ins().store(mem(), acc, row, (col * 4) as i32);
                } else {
                    for lane in 0..4 {
                        let c = kb.fb.ins().iadd_imm_s(j, (col + lane) as i64);
                        let inside = kb.fb.ins().icmp(cranelift_codegen::ir::condcodes::IntCC::SignedLessThan, c, q.n);
                        let x = kb.fb.ins().extractlane(acc, lane as u8);
                        kb.if_then(inside, |kb| {
                            kb.fb.ins().store(mem(), x, row, ((col + lane) * 4) as i32);
                        });
                    }
                }
            }
        }
    }
}

/// One block of `len` k steps: loads the block's scales (and offsets) for the tile's columns,
/// then multiply-adds. `st` is the accumulators, the A pointer and the record pointer; the A
/// pointer comes back advanced by `len` floats.
fn block(kb: &mut Kb, q: &Q, st: &[Value], rows: usize, halves: &[usize], len: usize) -> Vec<Value> {
    let pk = q.pk;
    let nacc = rows * halves.len() * 2;
    let (a_ptr, rec) = (st[nacc], st[nacc + 1]);
    let mut scale = Vec::new();
    let mut offset = Vec::new();
    for &h in halves {
        for v in 0..2 {
            let col = (h * 8 + v * 4) as i32;
            scale.push(kb.fb.ins().load(types::F32X4, mem(), rec, col * 4));
            if pk.asym {
                offset.push(kb.fb.ins().load(types::F32X4, mem(), rec, 64 + col * 4));
            }
        }
    }
    let q_ptr = kb.fb.ins().iadd_imm_s(rec, pk.header_bytes() as i64);
    let mut state = st[..nacc].to_vec();
    state.extend([a_ptr, q_ptr]);
    let zero = kb.iconst(0);
    let end = kb.iconst(len as i64);
    let row_stride = (q.k * 4) as i32;
    let (_, fin) = kb.fold_range(zero, end, 1, &state, |kb, _, st| {
        let (acc, ptrs) = st.split_at(nacc);
        let (a, qp) = (ptrs[0], ptrs[1]);
        // The weights of this k step, dequantized.
        let mut w = Vec::new();
        let packed4 = (pk.layout.bits == 4).then(|| kb.fb.ins().uload8x8(mem(), qp, 0));
        for &h in halves {
            let q16 = match (pk.layout.bits, pk.asym, packed4) {
                (4, asym, Some(raw)) => {
                    let nib = if h == 0 {
                        let mask = kb.fb.ins().iconst(types::I16, 15);
                        let mask = kb.fb.ins().splat(types::I16X8, mask);
                        kb.fb.ins().band(raw, mask)
                    } else {
                        kb.fb.ins().ushr_imm_s(raw, 4)
                    };
                    if asym {
                        nib
                    } else {
                        let eight = kb.fb.ins().iconst(types::I16, 8);
                        let eight = kb.fb.ins().splat(types::I16X8, eight);
                        kb.fb.ins().isub(nib, eight)
                    }
                }
                (_, false, _) => kb.fb.ins().sload8x8(mem(), qp, (h * 8) as i32),
                (_, true, _) => kb.fb.ins().uload8x8(mem(), qp, (h * 8) as i32),
            };
            let lo = kb.fb.ins().swiden_low(q16);
            let hi = kb.fb.ins().swiden_high(q16);
            for half in [lo, hi] {
                let f = kb.fb.ins().fcvt_from_sint(types::F32X4, half);
                let slot = w.len();
                w.push(if pk.asym {
                    Fm::new(kb, types::F32X4).fma(f, scale[slot], offset[slot])
                } else {
                    kb.fb.ins().fmul(f, scale[slot])
                });
            }
        }
        let mut out = Vec::with_capacity(nacc + 2);
        for r in 0..rows {
            let x = kb.fb.ins().load(types::F32, mem(), a, row_stride * r as i32);
            let x = kb.fb.ins().splat(types::F32X4, x);
            for (c, &wv) in w.iter().enumerate() {
                let prev = acc[r * w.len() + c];
                out.push(if q.split_fma {
                    let t = kb.fb.ins().fmul(x, wv);
                    kb.fb.ins().fadd(prev, t)
                } else {
                    Fm::new(kb, types::F32X4).fma(x, wv, prev)
                });
            }
        }
        out.push(kb.fb.ins().iadd_imm_s(a, 4));
        out.push(kb.fb.ins().iadd_imm_s(qp, pk.row_bytes() as i64));
        out
    });
    let mut out = fin[..nacc].to_vec();
    out.extend([fin[nacc], rec]);
    out
}

/// Targets without vectors: one row by the panel's 16 columns in scalar registers.
fn scalar_tile(kb: &mut Kb, q: &Q, pp: Value, i: Value, j: Value, full: bool) {
    let pk = q.pk;
    let a_off = kb.fb.ins().imul_imm_s(i, (q.k * 4) as i64);
    let a_ptr = kb.fb.ins().iadd(q.a, a_off);
    let zero_f = Fm::new(kb, types::F32).c(0.0);
    let bs = pk.layout.block_size;
    // A loop over the block records; k steps inside a block loop.
    let mut st = vec![zero_f; PANEL_COLS];
    st.extend([a_ptr, pp]);
    let zero = kb.iconst(0);
    let nb = kb.iconst((q.k / bs) as i64);
    let step = |kb: &mut Kb, st: &[Value], len: usize| -> Vec<Value> {
        let (a, rec) = (st[PANEL_COLS], st[PANEL_COLS + 1]);
        let mut sc = Vec::new();
        let mut of = Vec::new();
        for c in 0..PANEL_COLS {
            sc.push(kb.fb.ins().load(types::F32, mem(), rec, (c * 4) as i32));
            if pk.asym {
                of.push(kb.fb.ins().load(types::F32, mem(), rec, (64 + c * 4) as i32));
            }
        }
        let qp = kb.fb.ins().iadd_imm_s(rec, pk.header_bytes() as i64);
        let mut state = st[..PANEL_COLS].to_vec();
        state.extend([a, qp]);
        let z = kb.iconst(0);
        let end = kb.iconst(len as i64);
        let (_, fin) = kb.fold_range(z, end, 1, &state, |kb, _, st| {
            let (a, qp) = (st[PANEL_COLS], st[PANEL_COLS + 1]);
            let x = kb.fb.ins().load(types::F32, mem(), a, 0);
            let mut out = Vec::new();
            for c in 0..PANEL_COLS {
                let v = match (pk.layout.bits, pk.asym) {
                    (4, asym) => {
                        let byte = kb.fb.ins().uload8(types::I32, mem(), qp, (c % 8) as i32);
                        let sh = kb.fb.ins().ushr_imm_s(byte, (4 * (c / 8)) as i64);
                        let nib = kb.fb.ins().band_imm_s(sh, 15);
                        if asym {
                            nib
                        } else {
                            kb.fb.ins().iadd_imm_s(nib, -8)
                        }
                    }
                    (_, false) => kb.fb.ins().sload8(types::I32, mem(), qp, c as i32),
                    (_, true) => kb.fb.ins().uload8(types::I32, mem(), qp, c as i32),
                };
                let f = kb.fb.ins().fcvt_from_sint(types::F32, v);
                let w = if pk.asym { Fm::new(kb, types::F32).fma(f, sc[c], of[c]) } else { kb.fb.ins().fmul(f, sc[c]) };
                out.push(Fm::new(kb, types::F32).fma(x, w, st[c]));
            }
            out.push(kb.fb.ins().iadd_imm_s(a, 4));
            out.push(kb.fb.ins().iadd_imm_s(qp, pk.row_bytes() as i64));
            out
        });
        let mut out = fin[..PANEL_COLS].to_vec();
        out.extend([fin[PANEL_COLS], rec]);
        out
    };
    let (_, fin) = kb.fold_range(zero, nb, 1, &st, |kb, _, st| {
        let mut out = step(kb, st, bs);
        out[PANEL_COLS + 1] = kb.fb.ins().iadd_imm_s(out[PANEL_COLS + 1], pk.record_bytes() as i64);
        out
    });
    st = fin;
    if !q.k.is_multiple_of(bs) {
        st = step(kb, &st, q.k % bs);
    }
    let acc = &st[..PANEL_COLS];
    let off = kb.fb.ins().imul_imm_s(i, (pk.layout.n * 4) as i64);
    let row = kb.fb.ins().iadd(q.out, off);
    let jo = kb.fb.ins().ishl_imm_s(j, 2);
    let row = kb.fb.ins().iadd(row, jo);
    for (c, &v) in acc.iter().enumerate() {
        if full {
            kb.fb.ins().store(mem(), v, row, (c * 4) as i32);
        } else {
            let col = kb.fb.ins().iadd_imm_s(j, c as i64);
            let inside = kb.fb.ins().icmp(cranelift_codegen::ir::condcodes::IntCC::SignedLessThan, col, q.n);
            kb.if_then(inside, |kb| {
                kb.fb.ins().store(mem(), v, row, (c * 4) as i32);
            });
        }
    }
}

//! Matmul with a quantized weight: out[m, n] = sum_k A[m, k] * W[k, n], W read from its packed
//! 4- or 8-bit form (`layout::NBitsPacking`) and dequantized in registers, never materialised.
//!
//! Per 16-column panel and per block of K: the block's scales (and offsets) are loaded once, then
//! every k step loads one row of 8 or 16 bytes, widens it to f32x4 vectors, scales them and
//! multiply-adds them into a tile of accumulators (4 rows x 8 or 16 columns for prompts, per
//! target (`tiles::Tiles`), 1 row x 16 columns for decoding). Targets without vectors run a scalar 1 x 16 tile over the same bytes.

use cranelift_codegen::ir::{types, InstBuilder, Value};

use cranelift_codegen::ir::condcodes::IntCC;

use super::emit::{mem, mem_ro, Kb, Loc};
use super::layout::{NBitsPacking, PANEL_COLS};
use super::math::Fm;
use super::matmul::{column_range, finish, Epilogue, MatMulKernel, Stage};
use crate::ir::Dim;

struct Q<'m> {
    pk: &'m NBitsPacking,
    a: Value,
    b: Value,
    out: Value,
    /// Columns of the whole matrix (stores past it are skipped).
    n: Value,
    k: usize,
    epi: &'m Epilogue,
}

pub fn emit(kb: &mut Kb, mm: &MatMulKernel, pk: &NBitsPacking, units: Option<(Value, Value)>) {
    let q = Q {
        pk,
        a: kb.base(mm.a.loc),
        b: kb.base(mm.b.loc),
        out: kb.base(mm.out.loc),
        n: kb.iconst(pk.layout.n as i64),
        k: pk.layout.k,
        epi: &mm.epi,
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
    // SwiGLU: the up half's panels follow the gate half's (packed separately by the planner).
    let up = (q.pk.panels() * q.pk.panel_bytes()) as i64;
    let pp_of = |kb: &mut Kb, st: Stage| if st == Stage::Up { kb.fb.ins().iadd_imm_s(pp, up) } else { pp };
    let stages = q.epi.stages();
    let shape = super::tiles::Tiles::for_target(kb.target);
    // Blocks of rows share each chunk of weights (prompts), then single rows (decode): integer-dot
    // tiles of `int_dot_rows`, float tiles of 4 rows, scalar code (no vectors) row by row.
    let simd = kb.target.simd();
    let rows = if q.pk.int_dot {
        shape.int_dot_rows
    } else if simd {
        4
    } else {
        1
    };
    // Float prompt tiles span the whole panel where the registers hold it, else each half.
    let halves: &[&[usize]] = if shape.nbits_cols == 16 { &[&[0, 1]] } else { &[&[0], &[1]] };
    kb.row_blocks(m, rows, |kb, i, r| {
        for &st in stages {
            let p = pp_of(kb, st);
            if q.pk.int_dot {
                int_tile(kb, q, p, i, j, r, full, st);
            } else if !simd {
                scalar_tile(kb, q, p, i, j, full, st);
            } else if r == 1 {
                tile(kb, q, p, i, j, 1, &[0, 1], full, st);
            } else {
                for h in halves {
                    tile(kb, q, p, i, j, r, h, full, st);
                }
            }
        }
    });
}

/// A tile of `rows` rows and the 8-column `halves` of the panel at `pp` (column `j`).
#[allow(clippy::too_many_arguments)]
fn tile(kb: &mut Kb, q: &Q, pp: Value, i: Value, j: Value, rows: usize, halves: &[usize], full: bool, st: Stage) {
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
    let (_, mut acc) = kb.fold_range(zero, nb, 1, &state, |kb, _, st| {
        let mut out = block(kb, q, st, rows, halves, bs);
        let rec = out[nacc + 1];
        out[nacc + 1] = kb.fb.ins().iadd_imm_s(rec, pk.record_bytes() as i64);
        out
    });
    if tail > 0 {
        acc = block(kb, q, &acc, rows, halves, tail);
    }
    for r in 0..rows {
        let ir = kb.fb.ins().iadd_imm_s(i, r as i64);
        for (hi, &h) in halves.iter().enumerate() {
            for v in 0..2 {
                store_vec(kb, q, ir, j, h * 8 + v * 4, acc[(r * halves.len() + hi) * 2 + v], full, st);
            }
        }
    }
}

/// Stores the f32x4 of columns j + col .. j + col + 4 of row `i` after the epilogue, skipping
/// columns past N unless the panel is `full`.
#[allow(clippy::too_many_arguments)]
fn store_vec(kb: &mut Kb, q: &Q, i: Value, j: Value, col: usize, acc: Value, full: bool, st: Stage) {
    let off = kb.fb.ins().imul_imm_s(i, (q.pk.layout.n * 4) as i64);
    let row = kb.fb.ins().iadd(q.out, off);
    let jo = kb.fb.ins().ishl_imm_s(j, 2);
    let row = kb.fb.ins().iadd(row, jo);
    if full {
        let c = kb.fb.ins().iadd_imm_s(j, col as i64);
        let v = epilogue(kb, q, st, acc, types::F32X4, c, row, (col * 4) as i32);
        kb.fb.ins().store(mem(), v, row, (col * 4) as i32);
        return;
    }
    // Lane by lane: the bias and the gate values past N must not be read.
    for lane in 0..4 {
        let c = kb.fb.ins().iadd_imm_s(j, (col + lane) as i64);
        let inside = kb.fb.ins().icmp(IntCC::SignedLessThan, c, q.n);
        let x = kb.fb.ins().extractlane(acc, lane as u8);
        kb.if_then(inside, |kb| {
            let x = epilogue(kb, q, st, x, types::F32, c, row, ((col + lane) * 4) as i32);
            kb.fb.ins().store(mem(), x, row, ((col + lane) * 4) as i32);
        });
    }
}

/// The fused epilogue, when there is one.
#[allow(clippy::too_many_arguments)]
fn epilogue(kb: &mut Kb, q: &Q, st: Stage, v: Value, ty: types::Type, col: Value, addr: Value, off: i32) -> Value {
    if q.epi.act.is_none() && q.epi.bias.is_none() && !q.epi.glu {
        return v;
    }
    finish(kb, q.epi, st, v, ty, col, addr, off)
}

/// The integer-dot tile: `rows` rows of int8 activations (scratch) by the panel's 16 columns. Per
/// block and row, four i32x4 accumulators (lanes = columns) collect exact dot products of 4 (int8)
/// or 8 (int4) k steps per 64-byte chunk; then acc += (dot - zero * sum(q)) * (scale * act_scale).
/// Each chunk of weights is loaded and unpacked once for all the rows.
#[allow(clippy::too_many_arguments)]
fn int_tile(kb: &mut Kb, q: &Q, pp: Value, i: Value, j: Value, rows: usize, full: bool, st: Stage) {
    let pk = q.pk;
    let bs = pk.layout.block_size;
    // Rows of the activation scratch are a fixed distance apart: immediate offsets from row 0.
    let rb = pk.act_row_bytes() as i32;
    let x_off = kb.fb.ins().imul_imm_s(i, rb as i64);
    let x_row = kb.fb.ins().iadd(q.a, x_off);
    let s_ptr = kb.fb.ins().iadd_imm_s(x_row, pk.act_scales_offset() as i64);
    let nacc = 4 * rows;
    let zero_f = Fm::new(kb, types::F32X4).c(0.0);
    let mut state = vec![zero_f; nacc];
    state.extend([pp, x_row, s_ptr]);
    let zero = kb.iconst(0);
    let nb = kb.iconst(pk.layout.blocks() as i64);
    let pmaddubsw = (pk.layout.bits == 4 || pk.no_i8_min)
        && kb.target.arch == edgec_runtime::Arch::X86_64
        && kb.target.has("ssse3");
    let sdot = kb.target.arch == edgec_runtime::Arch::Aarch64 && kb.target.has("dotprod");
    // 4-bit pmaddubsw sums stay in i16 for up to 4 chunks (|x| <= 128, w <= 15: 4 * 2 * 2 * 15 *
    // 128 < 2^15), then widen once: a group of chunks is unrolled with i16 accumulators. 8-bit
    // pair sums (up to 2 * 127 * 128) widen after every chunk.
    let chunks = bs / pk.chunk_k();
    let group = match (pmaddubsw, pk.layout.bits) {
        (true, 4) => (1..=4).rev().find(|g| chunks.is_multiple_of(*g)).unwrap_or(1),
        _ => 1,
    };
    let (_, fin) = kb.fold_range(zero, nb, 1, &state, |kb, _, st| {
        let (rec, xp, sp) = (st[nacc], st[nacc + 1], st[nacc + 2]);
        let zi = kb.fb.ins().iconst(types::I32, 0);
        let zi = kb.fb.ins().splat(types::I32X4, zi);
        let mut inner = vec![zi; nacc];
        let qp = kb.fb.ins().iadd_imm_s(rec, pk.header_bytes() as i64);
        inner.extend([qp, xp]);
        let z = kb.iconst(0);
        let groups = kb.iconst((chunks / group) as i64);
        let (_, dots) = kb.fold_range(z, groups, 1, &inner, |kb, _, st| {
            let (mut qp, mut xp) = (st[nacc], st[nacc + 1]);
            let mut out: Vec<Value> = if pmaddubsw {
                let mut sums: Vec<Value> = Vec::with_capacity(nacc);
                for c in 0..group {
                    let d = if pk.layout.bits == 4 {
                        chunk_i16(kb, qp, xp, rows, rb)
                    } else {
                        chunk_i16_s8(kb, qp, xp, rows, rb)
                    };
                    sums = if c == 0 { d } else { sums.iter().zip(d).map(|(&a, b)| kb.fb.ins().iadd(a, b)).collect() };
                    qp = kb.fb.ins().iadd_imm_s(qp, 64);
                    xp = kb.fb.ins().iadd_imm_s(xp, pk.chunk_k() as i64);
                }
                sums.iter()
                    .zip(&st[..nacc])
                    .map(|(&s, &acc)| {
                        // Adjacent i16 sums widened: pmaddwd by ones on x64.
                        let lo = kb.fb.ins().swiden_low(s);
                        let hi = kb.fb.ins().swiden_high(s);
                        let d = kb.fb.ins().iadd_pairwise(lo, hi);
                        kb.fb.ins().iadd(acc, d)
                    })
                    .collect()
            } else {
                let acc = chunk_i32(kb, pk, qp, xp, &st[..nacc], rb, sdot);
                qp = kb.fb.ins().iadd_imm_s(qp, 64);
                xp = kb.fb.ins().iadd_imm_s(xp, pk.chunk_k() as i64);
                acc
            };
            out.extend([qp, xp]);
            out
        });
        let mut out = Vec::with_capacity(nacc + 3);
        for r in 0..rows {
            let ro = r as i32 * rb;
            let sx = kb.fb.ins().load(types::F32, mem(), sp, ro);
            let sx = kb.fb.ins().splat(types::F32X4, sx);
            let sum = kb.fb.ins().load(types::I32, mem(), sp, ro + 4);
            // A symmetric weight's zero is one number for every column: one correction for the block.
            let implied = match (pk.asym, pk.implied_zero()) {
                (false, 0) => None,
                (false, z) => {
                    let c = kb.fb.ins().imul_imm_s(sum, z as i64);
                    Some(kb.fb.ins().splat(types::I32X4, c))
                }
                (true, _) => None,
            };
            let sum = kb.fb.ins().splat(types::I32X4, sum);
            for cg in 0..4 {
                let a = r * 4 + cg;
                // sum (w - z) x = dot - z * sum(x), exactly in i32, then one rounding to f32.
                let s = kb.fb.ins().load(types::F32X4, mem(), rec, 16 * cg as i32);
                let d = if pk.asym {
                    let z = kb.fb.ins().load(types::I32X4, mem(), rec, 64 + 16 * cg as i32);
                    let zs = kb.fb.ins().imul(z, sum);
                    kb.fb.ins().isub(dots[a], zs)
                } else {
                    match implied {
                        Some(zs) => kb.fb.ins().isub(dots[a], zs),
                        None => dots[a],
                    }
                };
                // A static activation zero point: sum (w - z) (x - za) = ... - za * sum (w - z), the
                // last term per column from the record.
                let d = if pk.act_correction() {
                    let off = (pk.act_correction_offset() + 16 * cg) as i32;
                    let c = kb.fb.ins().load(types::I32X4, mem(), rec, off);
                    kb.fb.ins().isub(d, c)
                } else {
                    d
                };
                let f = kb.fb.ins().fcvt_from_sint(types::F32X4, d);
                let scale = kb.fb.ins().fmul(s, sx);
                out.push(Fm::new(kb, types::F32X4).fma(f, scale, st[a]));
            }
        }
        out.push(kb.fb.ins().iadd_imm_s(rec, pk.record_bytes() as i64));
        out.push(dots[nacc + 1]);
        out.push(kb.fb.ins().iadd_imm_s(sp, 8));
        out
    });
    for r in 0..rows {
        let ir = kb.fb.ins().iadd_imm_s(i, r as i64);
        for cg in 0..4 {
            store_vec(kb, q, ir, j, cg * 4, fin[r * 4 + cg], full, st);
        }
    }
}

/// The low and high nibbles of 16 bytes at `qp + off`, each as i8x16 (values 0..15).
fn nibbles(kb: &mut Kb, qp: Value, off: i32) -> (Value, Value) {
    // (An i32 splat: x64 without SSSE3 has no byte shuffle for an i8 splat.)
    let mask = kb.fb.ins().iconst(types::I32, 0x0f0f_0f0f);
    let mask = kb.fb.ins().splat(types::I32X4, mask);
    let mask = kb.fb.ins().bitcast(types::I8X16, vec_flags(), mask);
    let raw = kb.fb.ins().load(types::I8X16, mem_ro(), qp, off);
    let lo = kb.fb.ins().band(raw, mask);
    let wide = kb.fb.ins().bitcast(types::I16X8, vec_flags(), raw);
    let shifted = kb.fb.ins().ushr_imm_s(wide, 4);
    let shifted = kb.fb.ins().bitcast(types::I8X16, vec_flags(), shifted);
    (lo, kb.fb.ins().band(shifted, mask))
}

/// One 4-bit chunk (16 columns x 8 k steps at `qp`) for `rows` rows of activations (at `xp`,
/// `rb` bytes apart) with x86's pmaddubsw: per row and group of 4 columns, i16x8 pair sums (u8
/// nibbles x s8 activations: 2 * 15 * 127 fits), row by row.
fn chunk_i16(kb: &mut Kb, qp: Value, xp: Value, rows: usize, rb: i32) -> Vec<Value> {
    let xs: Vec<(Value, Value)> = (0..rows)
        .map(|r| (splat_i32_bytes(kb, xp, r as i32 * rb), splat_i32_bytes(kb, xp, r as i32 * rb + 4)))
        .collect();
    let mut out = vec![None; rows * 4];
    for cg in 0..4 {
        let (lo, hi) = nibbles(kb, qp, 16 * cg);
        for (r, &(xa, xb)) in xs.iter().enumerate() {
            let p0 = kb.fb.ins().x86_pmaddubsw(xa, lo);
            let p1 = kb.fb.ins().x86_pmaddubsw(xb, hi);
            out[r * 4 + cg as usize] = Some(kb.fb.ins().iadd(p0, p1));
        }
    }
    out.into_iter().map(Option::unwrap).collect()
}

/// One 8-bit chunk (16 columns x 4 k steps at `qp`) for `rows` rows of activations with x86's
/// pmaddubsw, which multiplies signed by unsigned bytes: |x| as the unsigned operand and the
/// weights with x's sign, `(w ^ m) - m` with m = x < 0 (no weight is -128: `no_i8_min`), so the
/// i16 pair sums (at most 2 * 127 * 128) are exact. Per row and group of 4 columns, i16x8.
fn chunk_i16_s8(kb: &mut Kb, qp: Value, xp: Value, rows: usize, rb: i32) -> Vec<Value> {
    let zero = kb.fb.ins().iconst(types::I32, 0);
    let zero = kb.fb.ins().splat(types::I32X4, zero);
    let zero = kb.fb.ins().bitcast(types::I8X16, vec_flags(), zero);
    let xs: Vec<(Value, Value)> = (0..rows)
        .map(|r| {
            let x = splat_i32_bytes(kb, xp, r as i32 * rb);
            let magnitude = kb.fb.ins().iabs(x);
            let negative = kb.fb.ins().icmp(IntCC::SignedLessThan, x, zero);
            (magnitude, negative)
        })
        .collect();
    let mut out = vec![None; rows * 4];
    for cg in 0..4 {
        let w = kb.fb.ins().load(types::I8X16, mem_ro(), qp, 16 * cg);
        for (r, &(magnitude, negative)) in xs.iter().enumerate() {
            let flipped = kb.fb.ins().bxor(w, negative);
            let signed = kb.fb.ins().isub(flipped, negative);
            out[r * 4 + cg as usize] = Some(kb.fb.ins().x86_pmaddubsw(signed, magnitude));
        }
    }
    out.into_iter().map(Option::unwrap).collect()
}

/// One chunk (16 columns x 4 or 8 k steps) added into the i32x4 accumulators `acc` (4 per row,
/// lanes = columns) of `rows` = acc.len() / 4 rows of activations at `xp`, `rb` bytes apart: with
/// `sdot` in the tree aarch64 folds into SDOT, else widened to i16 pairs.
fn chunk_i32(kb: &mut Kb, pk: &NBitsPacking, qp: Value, xp: Value, acc: &[Value], rb: i32, sdot: bool) -> Vec<Value> {
    let rows = acc.len() / 4;
    let dot = |kb: &mut Kb, w: Value, x: Value, acc: Value| -> Value {
        if sdot {
            sdot_tree(kb, w, x, acc)
        } else {
            // An activation splat repeats every 4 bytes: its low half is the whole pattern.
            let x16 = kb.fb.ins().swiden_low(x);
            let d = dot4(kb, w, x16);
            kb.fb.ins().iadd(acc, d)
        }
    };
    let four_bit = pk.layout.bits == 4;
    let xs: Vec<(Value, Option<Value>)> = (0..rows)
        .map(|r| {
            let o = r as i32 * rb;
            (splat_i32_bytes(kb, xp, o), four_bit.then(|| splat_i32_bytes(kb, xp, o + 4)))
        })
        .collect();
    let mut out = acc.to_vec();
    for cg in 0..4 {
        if four_bit {
            let (lo, hi) = nibbles(kb, qp, 16 * cg);
            for (r, &(xa, xb)) in xs.iter().enumerate() {
                let a = dot(kb, lo, xa, out[r * 4 + cg as usize]);
                out[r * 4 + cg as usize] = dot(kb, hi, xb.unwrap(), a);
            }
        } else {
            let raw = kb.fb.ins().load(types::I8X16, mem_ro(), qp, 16 * cg);
            for (r, &(xa, _)) in xs.iter().enumerate() {
                out[r * 4 + cg as usize] = dot(kb, raw, xa, out[r * 4 + cg as usize]);
            }
        }
    }
    out
}

/// `acc + lane sums of 4 byte products of a and b`, spelt as the exact i32 tree that Cranelift's
/// aarch64 backend folds into one SDOT when the target has dotprod.
fn sdot_tree(kb: &mut Kb, a: Value, b: Value, acc: Value) -> Value {
    let (al, bl) = (kb.fb.ins().swiden_low(a), kb.fb.ins().swiden_low(b));
    let (ah, bh) = (kb.fb.ins().swiden_high(a), kb.fb.ins().swiden_high(b));
    let lo = kb.fb.ins().imul(al, bl);
    let hi = kb.fb.ins().imul(ah, bh);
    let pair = |kb: &mut Kb, x: Value| {
        let (l, h) = (kb.fb.ins().swiden_low(x), kb.fb.ins().swiden_high(x));
        kb.fb.ins().iadd_pairwise(l, h)
    };
    let (pl, ph) = (pair(kb, lo), pair(kb, hi));
    let d = kb.fb.ins().iadd_pairwise(pl, ph);
    kb.fb.ins().iadd(d, acc)
}

fn vec_flags() -> cranelift_codegen::ir::MemFlagsData {
    cranelift_codegen::ir::MemFlagsData::new().with_endianness(cranelift_codegen::ir::Endianness::Little)
}

/// The 4 bytes at `p + off` repeated into all four 32-bit lanes, as i8x16.
fn splat_i32_bytes(kb: &mut Kb, p: Value, off: i32) -> Value {
    let w = kb.fb.ins().load(types::I32, mem(), p, off);
    let v = kb.fb.ins().splat(types::I32X4, w);
    kb.fb.ins().bitcast(types::I8X16, vec_flags(), v)
}

/// i32x4 of sums of adjacent i16 products: the tree x64 lowers to pmaddwd.
fn pmaddwd(kb: &mut Kb, a: Value, b: Value) -> Value {
    let (al, bl) = (kb.fb.ins().swiden_low(a), kb.fb.ins().swiden_low(b));
    let (ah, bh) = (kb.fb.ins().swiden_high(a), kb.fb.ins().swiden_high(b));
    let lo = kb.fb.ins().imul(al, bl);
    let hi = kb.fb.ins().imul(ah, bh);
    kb.fb.ins().iadd_pairwise(lo, hi)
}

/// Lane c = sum over 4 bytes of w[4c..4c+4] * x (x: the 4 activation bytes as i16x8, repeated).
fn dot4(kb: &mut Kb, w: Value, x16: Value) -> Value {
    let wl = kb.fb.ins().swiden_low(w);
    let wh = kb.fb.ins().swiden_high(w);
    let dl = pmaddwd(kb, wl, x16);
    let dh = pmaddwd(kb, wh, x16);
    kb.fb.ins().iadd_pairwise(dl, dh)
}

/// Rounds each row of A to int8 per block of K into scratch (MatMulNBits accuracy_level 4):
/// scale = max |x| / 127 and q = round_half_even(x * 127 / max |x|), as the interpreter does; with
/// a static scale s and zero point z (`NBitsPacking::act`, stored as int8): q = clamp(round_half_even(x
/// / s) + z, -128, 127), ONNX QuantizeLinear's arithmetic, and every block's scale is s.
/// Integer-dot form: the int8 row (blocks zero-padded), then per block its scale and sum(q).
/// Otherwise the rounded values as f32, for the float kernel.
pub fn emit_quantize_rows(kb: &mut Kb, a: Loc, rows: &Dim, scratch: Loc, pk: &NBitsPacking) {
    let (k, bs) = (pk.layout.k, pk.layout.block_size);
    let (src0, dst0) = (kb.base(a), kb.base(scratch));
    let m = kb.dim(rows);
    let zero = kb.iconst(0);
    kb.for_range(zero, m, 1, |kb, r| {
        let so = kb.fb.ins().imul_imm_s(r, (k * 4) as i64);
        let src = kb.fb.ins().iadd(src0, so);
        let d_off = kb.fb.ins().imul_imm_s(r, pk.act_row_bytes() as i64);
        let dst = kb.fb.ins().iadd(dst0, d_off);
        let sp = kb.fb.ins().iadd_imm_s(dst, pk.act_scales_offset() as i64);
        let nb = kb.iconst((k / bs) as i64);
        let z = kb.iconst(0);
        let (_, st) = kb.fold_range(z, nb, 1, &[src, dst, sp], |kb, _, st| quantize_block(kb, pk, st, bs, bs));
        if !k.is_multiple_of(bs) {
            quantize_block(kb, pk, &st, k % bs, bs);
        }
    });
}

/// One block of `len` values (in a `block`-sized slot); `st` = source, destination and scale
/// pointers, returned advanced.
fn quantize_block(kb: &mut Kb, pk: &NBitsPacking, st: &[Value], len: usize, block: usize) -> Vec<Value> {
    let (src, dst, sp) = (st[0], st[1], st[2]);
    let z = kb.iconst(0);
    let n = kb.iconst(len as i64);
    // The integer-dot form runs 4 values at a time (the float fallback is for targets without
    // vectors); any rest goes one by one below.
    let vec4 = pk.int_dot && kb.target.simd();
    // max |x| over [start, n) in steps of `ty`'s lanes.
    let abs_max = |kb: &mut Kb, start: Value, ty: cranelift_codegen::ir::Type| {
        let z = Fm::new(kb, ty).c(0.0);
        let step = ty.lane_count() as i64;
        kb.fold_range(start, n, step, &[z], |kb, jj, acc| {
            let o = kb.fb.ins().ishl_imm_s(jj, 2);
            let p = kb.fb.ins().iadd(src, o);
            let x = kb.fb.ins().load(ty, mem(), p, 0);
            let mut fm = Fm::new(kb, ty);
            let ax = fm.abs(x);
            vec![fm.max(acc[0], ax)]
        })
    };
    let (mut j, mut zf) = (z, Fm::new(kb, types::F32).c(0.0));
    if vec4 && pk.act.is_none() {
        let (end, m4) = abs_max(kb, z, types::F32X4);
        j = end;
        for lane in 0..4u8 {
            let x = kb.fb.ins().extractlane(m4[0], lane);
            zf = Fm::new(kb, types::F32).max(zf, x);
        }
    }
    // Dynamic: (scale, 127 / max |x|) to multiply by; static: (s, s) to divide by.
    let (scale, inv) = if let Some(a) = pk.act {
        let s = Fm::new(kb, types::F32).c(a.scale as f64);
        (s, s)
    } else {
        let (_, tail) = abs_max(kb, j, types::F32);
        let amax = [Fm::new(kb, types::F32).max(zf, tail[0])];
        let mut fm = Fm::new(kb, types::F32);
        let c127 = fm.c(127.0);
        let scale = fm.div(amax[0], c127);
        let inv = fm.div(c127, amax[0]);
        let zero_f = fm.c(0.0);
        let is_zero = fm.cmp(cranelift_codegen::ir::condcodes::FloatCC::Equal, amax[0], zero_f);
        let inv = kb.fb.ins().select(is_zero, zero_f, inv);
        (kb.fb.ins().select(is_zero, zero_f, scale), inv)
    };
    let mut zi = kb.fb.ins().iconst(types::I32, 0);
    let mut j = z;
    if vec4 {
        let inv4 = kb.fb.ins().splat(types::F32X4, inv);
        let z4 = kb.fb.ins().splat(types::I32X4, zi);
        let (end, s4) = kb.fold_range(z, n, 4, &[z4], |kb, jj, acc| {
            let o = kb.fb.ins().ishl_imm_s(jj, 2);
            let p = kb.fb.ins().iadd(src, o);
            let x = kb.fb.ins().load(types::F32X4, mem(), p, 0);
            let r = to_grid(kb, types::F32X4, x, inv4, pk);
            let qi = kb.fb.ins().fcvt_to_sint_sat(types::I32X4, r);
            // q in -128..=127: narrowing to bytes is exact; the 4 bytes go out as one word.
            let h = kb.fb.ins().snarrow(qi, qi);
            let b = kb.fb.ins().snarrow(h, h);
            let w = kb.fb.ins().bitcast(types::I32X4, vec_flags(), b);
            let w = kb.fb.ins().extractlane(w, 0);
            let d = kb.fb.ins().iadd(dst, jj);
            kb.fb.ins().store(mem(), w, d, 0);
            vec![kb.fb.ins().iadd(acc[0], qi)]
        });
        j = end;
        for lane in 0..4u8 {
            let x = kb.fb.ins().extractlane(s4[0], lane);
            zi = kb.fb.ins().iadd(zi, x);
        }
    }
    let (_, sum) = kb.fold_range(j, n, 1, &[zi], |kb, jj, acc| {
        let o = kb.fb.ins().ishl_imm_s(jj, 2);
        let p = kb.fb.ins().iadd(src, o);
        let x = kb.fb.ins().load(types::F32, mem(), p, 0);
        let r = to_grid(kb, types::F32, x, inv, pk);
        if pk.int_dot {
            let qi = kb.fb.ins().fcvt_to_sint_sat(types::I32, r);
            let d = kb.fb.ins().iadd(dst, jj);
            kb.fb.ins().istore8(mem(), qi, d, 0);
            vec![kb.fb.ins().iadd(acc[0], qi)]
        } else {
            let mut fm = Fm::new(kb, types::F32);
            let za = fm.c(pk.act.map_or(0, |a| a.stored_zero()) as f64);
            let r = fm.sub(r, za);
            let v = fm.mul(r, scale);
            let d = kb.fb.ins().iadd(dst, o);
            kb.fb.ins().store(mem(), v, d, 0);
            acc.to_vec()
        }
    });
    let src = kb.fb.ins().iadd_imm_s(src, (len * 4) as i64);
    if !pk.int_dot {
        let dst = kb.fb.ins().iadd_imm_s(dst, (len * 4) as i64);
        return vec![src, dst, sp];
    }
    // The padded tail of a partial block multiplies zero activations.
    for j in len..block {
        let zb = kb.fb.ins().iconst(types::I32, 0);
        kb.fb.ins().istore8(mem(), zb, dst, j as i32);
    }
    kb.fb.ins().store(mem(), scale, sp, 0);
    kb.fb.ins().store(mem(), sum[0], sp, 4);
    let dst = kb.fb.ins().iadd_imm_s(dst, block as i64);
    let sp = kb.fb.ins().iadd_imm_s(sp, 8);
    vec![src, dst, sp]
}

/// `x` on the int8 grid (f32 of an integer): round(x * inv), or with a static scale
/// (`inv` = s) clamp(round(x / s) + zero, -128, 127).
fn to_grid(kb: &mut Kb, ty: cranelift_codegen::ir::Type, x: Value, inv: Value, pk: &NBitsPacking) -> Value {
    let mut fm = Fm::new(kb, ty);
    let Some(a) = pk.act else {
        let y = fm.mul(x, inv);
        return fm.round(y);
    };
    let y = fm.div(x, inv);
    let r = fm.round(y);
    let z = fm.c(a.stored_zero() as f64);
    let r = fm.add(r, z);
    let (lo, hi) = (fm.c(-128.0), fm.c(127.0));
    let r = fm.max(r, lo);
    fm.min(r, hi)
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
    // A single row with symmetric weights (decode) sums x * (q - zero) over the block in its own
    // accumulators and applies the column scales once at the end: one multiply per column per
    // block instead of per k step. (Prompt tiles have no registers to spare for that.)
    let factored = rows == 1 && !pk.asym;
    let mut state = if factored { vec![Fm::new(kb, types::F32X4).c(0.0); nacc] } else { st[..nacc].to_vec() };
    state.extend([a_ptr, q_ptr]);
    let zero = kb.iconst(0);
    let end = kb.iconst(len as i64);
    let row_stride = (q.k * 4) as i32;
    // Decoding 8-bit weights streams them too slowly for the hardware prefetcher: touch the line
    // TOUCH_AHEAD bytes on (a load that may trap, so it is not removed; `touch_pad` pads for it).
    let touch = factored && pk.touch_pad() > 0;
    let one = |kb: &mut Kb, st: &[Value]| -> Vec<Value> {
        let (acc, ptrs) = st.split_at(nacc);
        let (a, qp) = (ptrs[0], ptrs[1]);
        if touch {
            let ahead = super::layout::TOUCH_AHEAD as i32;
            kb.fb.ins().load(types::I8, cranelift_codegen::ir::MemFlagsData::new(), qp, ahead);
        }
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
                } else if factored {
                    f
                } else {
                    kb.fb.ins().fmul(f, scale[slot])
                });
            }
        }
        let mut out = Vec::with_capacity(nacc + 2);
        for r in 0..rows {
            let x = kb.fb.ins().load(types::F32, mem_ro(), a, row_stride * r as i32);
            let x = kb.fb.ins().splat(types::F32X4, x);
            for (c, &wv) in w.iter().enumerate() {
                let prev = acc[r * w.len() + c];
                // fma, not mul + add: SmolLM2 int4 decode 30.5 -> 33.2 tok/s (median of 4).
                out.push(Fm::new(kb, types::F32X4).fma(x, wv, prev));
            }
        }
        out.push(kb.fb.ins().iadd_imm_s(a, 4));
        out.push(kb.fb.ins().iadd_imm_s(qp, pk.row_bytes() as i64));
        out
    };
    // Multi-row tiles take `k_unroll` k steps per loop iteration (x86: see `tiles`).
    let unroll = super::tiles::Tiles::for_target(kb.target).k_unroll;
    let unroll = if rows > 1 && len.is_multiple_of(unroll) { unroll } else { 1 };
    let (_, fin) = kb
        .fold_range(zero, end, unroll as i64, &state, |kb, _, st| (0..unroll).fold(st.to_vec(), |st, _| one(kb, &st)));
    let mut out: Vec<Value> = if factored {
        (0..nacc).map(|c| Fm::new(kb, types::F32X4).fma(fin[c], scale[c], st[c])).collect()
    } else {
        fin[..nacc].to_vec()
    };
    out.extend([fin[nacc], rec]);
    out
}

/// Targets without vectors: one row by the panel's 16 columns in scalar registers.
fn scalar_tile(kb: &mut Kb, q: &Q, pp: Value, i: Value, j: Value, full: bool, stage: Stage) {
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
        let col = kb.fb.ins().iadd_imm_s(j, c as i64);
        if full {
            let v = epilogue(kb, q, stage, v, types::F32, col, row, (c * 4) as i32);
            kb.fb.ins().store(mem(), v, row, (c * 4) as i32);
        } else {
            let inside = kb.fb.ins().icmp(cranelift_codegen::ir::condcodes::IntCC::SignedLessThan, col, q.n);
            kb.if_then(inside, |kb| {
                let v = epilogue(kb, q, stage, v, types::F32, col, row, (c * 4) as i32);
                kb.fb.ins().store(mem(), v, row, (c * 4) as i32);
            });
        }
    }
}

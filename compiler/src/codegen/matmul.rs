//! Matrix multiplication: out[b, m, n] = sum_k A[b, m, k] * B[b, k, n], with any element strides
//! for A and B and broadcast batch axes.
//!
//! f32 with a unit-stride B row uses a register-blocked micro-kernel: a tile of rows by f32x4
//! vectors (sized per target, `tiles::Tiles`) stays in registers across the whole k loop (A
//! broadcast per row, one B load per vector, one fma per accumulator); edges fall back to
//! narrower tiles, then to scalar columns.
//! Other dtypes and targets without vectors use scalar tiles of `MR` rows by four columns.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, InstBuilder, Type, Value};

use super::emit::{mem, mem_ro, Kb, Loc};
use super::map::{cast, compute_type, load_elem, store_elem};
use super::math::Fm;
use crate::ir::{Act, DType, Dim};

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
    /// B is stored in column panels of `plan::PANEL_COLS` (k stride 16 floats inside a panel).
    pub b_packed: bool,
    /// B is a quantized weight in packed form (MatMulNBits): `qmatmul` emits the kernel.
    pub b_nbits: Option<super::layout::NBitsPacking>,
    /// B is a pruned f32 weight in block-sparse form: `spmm` emits the kernel.
    pub b_sparse: Option<super::layout::SparseWeight>,
    /// What happens to each output tile before it is stored (fused `MatMulAct`).
    pub epi: Epilogue,
}

impl MatMulKernel {
    /// Every buffer location the kernel reads or writes (for `emit::parameterise`).
    pub fn locs_mut(&mut self) -> Vec<&mut Loc> {
        let mut v = vec![&mut self.a.loc, &mut self.b.loc, &mut self.out.loc];
        v.extend(self.a_zero.as_mut().map(|z| &mut z.0));
        v.extend(self.b_zero.as_mut().map(|z| &mut z.0));
        v.extend(self.epi.bias.as_mut());
        v
    }
}

/// A fused matmul's epilogue, applied to the accumulators while they are still in registers.
#[derive(Clone, Debug, Default)]
pub struct Epilogue {
    pub act: Option<Act>,
    /// f32 per output column.
    pub bias: Option<Loc>,
    /// SwiGLU: B holds the gate columns, then (from the next whole panel when packed) the up
    /// columns; each output tile is computed twice, `act(gate)` stored first and the up tile
    /// multiplied into it (the tile's lines are still in L1), so the [rows, 2N] product never
    /// exists.
    pub glu: bool,
}

/// Which half of a tile pass this is: a plain matmul (bias, activation), or the two halves of
/// a SwiGLU output tile.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Stage {
    Plain,
    Gate,
    Up,
}

impl Epilogue {
    pub fn stages(&self) -> &'static [Stage] {
        if self.glu {
            &[Stage::Gate, Stage::Up]
        } else {
            &[Stage::Plain]
        }
    }
}

/// The activation on an f32 or f32x4 value.
pub fn apply_act(kb: &mut Kb, act: Act, x: Value, ty: Type) -> Value {
    let mut fm = Fm::new(kb, ty);
    match act {
        Act::None => x,
        Act::Relu => {
            let z = fm.c(0.0);
            fm.max(x, z)
        }
        Act::Sigmoid => fm.sigmoid(x),
        Act::Tanh => fm.tanh(x),
        Act::Silu => {
            let s = fm.sigmoid(x);
            fm.mul(x, s)
        }
        Act::Gelu => {
            let c = fm.c(std::f64::consts::FRAC_1_SQRT_2);
            let t = fm.mul(x, c);
            let e = fm.erf(t);
            let one = fm.c(1.0);
            let e1 = fm.add(e, one);
            let h = fm.c(0.5);
            let hx = fm.mul(x, h);
            fm.mul(hx, e1)
        }
        Act::GeluTanh => {
            let x2 = fm.mul(x, x);
            let x3 = fm.mul(x2, x);
            let c3 = fm.c(0.044715);
            let inner = fm.fma(x3, c3, x);
            let c = fm.c((2.0 / std::f64::consts::PI).sqrt());
            let t = fm.mul(inner, c);
            let th = fm.tanh(t);
            let one = fm.c(1.0);
            let t1 = fm.add(th, one);
            let h = fm.c(0.5);
            let hx = fm.mul(x, h);
            fm.mul(hx, t1)
        }
    }
}

/// The value to store for an output element (or f32x4 of elements) `v` at column `col`, the
/// output address `addr + off`: bias and activation, or the SwiGLU halves.
#[allow(clippy::too_many_arguments)]
pub fn finish(
    kb: &mut Kb,
    epi: &Epilogue,
    stage: Stage,
    v: Value,
    ty: Type,
    col: Value,
    addr: Value,
    off: i32,
) -> Value {
    match stage {
        Stage::Up => {
            let g = kb.fb.ins().load(ty, mem(), addr, off);
            Fm::new(kb, ty).mul(g, v)
        }
        Stage::Gate => epi.act.map_or(v, |a| apply_act(kb, a, v, ty)),
        Stage::Plain => {
            let mut v = v;
            if let Some(b) = epi.bias {
                let base = kb.base(b);
                let o = kb.fb.ins().ishl_imm_s(col, 2);
                let p = kb.fb.ins().iadd(base, o);
                let bv = kb.fb.ins().load(ty, mem(), p, 0);
                v = Fm::new(kb, ty).add(v, bv);
            }
            epi.act.map_or(v, |a| apply_act(kb, a, v, ty))
        }
    }
}

/// Rows per scalar register tile (dtypes other than f32, targets without vectors), four columns
/// wide. f32x4 tiles are sized per target by `tiles::Tiles`.
pub const MR: usize = 4;

struct Ptrs {
    a: Value,
    b: Value,
    out: Value,
    /// Byte strides: A m, A k, B k, B n, out m, out n.
    s: [Value; 6],
    k: Value,
    azp: Option<(Value, Value)>,
    bzp: Option<(Value, Value)>,
    /// Bytes from a gate column of B to its up column (SwiGLU).
    up_off: Value,
    /// The k steps this pass covers (all of K unless K-blocked; `a` and `b` already point at its
    /// first step).
    pass: KPass,
}

/// One pass over a block of K (`Tiles::k_block`): `len` k steps; the accumulators start from the
/// output when `accumulate` is set (an earlier block wrote partial sums there), and only the last
/// block applies the epilogue.
#[derive(Clone, Copy)]
struct KPass {
    len: Value,
    accumulate: Option<Value>,
    last: bool,
}

/// Columns per parallel unit: `parallel_for` hands out ranges of these panels.
pub const COLS_PER_UNIT: i64 = 16;

/// The matmul's parallel units (column panels) and its multiply-adds, at run time.
pub fn units_and_work(kb: &mut Kb, mm: &MatMulKernel) -> (Value, Value) {
    let n = kb.dim(&mm.n);
    let units = kb.fb.ins().iadd_imm_s(n, COLS_PER_UNIT - 1);
    let units = kb.fb.ins().sdiv_imm_s(units, COLS_PER_UNIT);
    let m = kb.dim(&mm.m);
    let mut work = kb.fb.ins().imul(n, m);
    let k = kb.dim(&mm.k);
    work = kb.fb.ins().imul(work, k);
    for d in &mm.batch {
        let v = kb.dim(d);
        work = kb.fb.ins().imul(work, v);
    }
    (units, work)
}

/// The columns [lo, hi) of the parallel units `units` (all columns for `None`).
pub fn column_range(kb: &mut Kb, mm: &MatMulKernel, units: Option<(Value, Value)>) -> (Value, Value) {
    let n_all = kb.dim(&mm.n);
    match units {
        Some((b, e)) => {
            let lo = kb.fb.ins().imul_imm_s(b, COLS_PER_UNIT);
            let hi = kb.fb.ins().imul_imm_s(e, COLS_PER_UNIT);
            (lo, kb.fb.ins().smin(hi, n_all))
        }
        None => (kb.iconst(0), n_all),
    }
}

/// The matmul restricted to the column panels `units` (a range of `COLS_PER_UNIT`-column units;
/// `None` computes every column).
pub fn emit_matmul(kb: &mut Kb, mm: &MatMulKernel, units: Option<(Value, Value)>) {
    if let Some(pk) = &mm.b_nbits {
        return super::qmatmul::emit(kb, mm, pk, units);
    }
    if let Some(sp) = &mm.b_sparse {
        return super::spmm::emit(kb, mm, sp, units);
    }
    let batch: Vec<Value> = mm.batch.iter().map(|d| kb.dim(d)).collect();
    let strides: Vec<Vec<Value>> =
        [&mm.a, &mm.b, &mm.out].iter().map(|o| o.batch_strides.iter().map(|d| kb.dim(d)).collect()).collect();
    let bases = [kb.base(mm.a.loc), kb.base(mm.b.loc), kb.base(mm.out.loc)];
    let m = kb.dim(&mm.m);
    let (n_lo, n) = column_range(kb, mm, units);
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
    let up_off = if mm.b_packed {
        // The up half starts at the next whole panel (plan packs the halves separately).
        let nn = n_all_cols(kb, mm);
        let panels = kb.fb.ins().iadd_imm_s(nn, 15);
        let panels = kb.fb.ins().ushr_imm_s(panels, 4);
        let pb = kb.fb.ins().imul_imm_s(k, 64);
        kb.fb.ins().imul(panels, pb)
    } else {
        let nn = n_all_cols(kb, mm);
        kb.fb.ins().imul(nn, s[3])
    };
    let vector = kb.target.simd()
        && mm.a.dtype == DType::F32
        && mm.b.dtype == DType::F32
        && mm.b.strides[1].as_fixed() == Some(1)
        && mm.out.strides[1].as_fixed() == Some(1);
    let sizes = [mm.a.dtype.size(), mm.b.dtype.size(), mm.out.dtype.size()];
    kb.loop_nest(&batch, &strides, vec![zero; 3], &mut Vec::new(), &mut |kb, offs, _| {
        let p: Vec<Value> = (0..3).map(|i| kb.elem_addr(bases[i], offs[i], sizes[i])).collect();
        let whole = KPass { len: k, accumulate: None, last: true };
        let ptrs = Ptrs { a: p[0], b: p[1], out: p[2], s, k, azp, bzp, up_off, pass: whole };
        let shape = super::tiles::Tiles::for_target(kb.target);
        // K-blocking: a long K is split into blocks whose slice of every B panel and of A's rows
        // stay in cache while all the tiles pass over them (partial sums go through the output).
        // Only for packed f32 weights without a SwiGLU epilogue (its up pass reads finished gate
        // values).
        let blocked = vector && mm.b_packed && !mm.epi.glu;
        match mm.k.as_fixed().map(|k| k as usize).filter(|&k| blocked && k > shape.k_blocked_from) {
            None => columns(kb, mm, &ptrs, n_lo, n, m, vector),
            Some(k_all) => {
                let kc = shape.k_block;
                let blocks = k_all.div_ceil(kc);
                let zero = kb.iconst(0);
                let n_loop = kb.iconst(blocks as i64 - 1);
                let len = kb.iconst(kc as i64);
                let pass_at = |kb: &mut Kb, blk: Value, pass: KPass| {
                    let k0 = kb.fb.ins().imul_imm_s(blk, kc as i64);
                    let a_off = kb.fb.ins().imul(k0, s[1]);
                    let b_off = kb.fb.ins().imul(k0, s[2]);
                    let a = kb.fb.ins().iadd(ptrs.a, a_off);
                    let b = kb.fb.ins().iadd(ptrs.b, b_off);
                    Ptrs { a, b, pass, ..ptrs }
                };
                kb.for_range(zero, n_loop, 1, |kb, blk| {
                    let acc = kb.fb.ins().icmp_imm_s(IntCC::NotEqual, blk, 0);
                    let p = pass_at(kb, blk, KPass { len, accumulate: Some(acc), last: false });
                    columns(kb, mm, &p, n_lo, n, m, vector);
                });
                let last = kb.iconst(blocks as i64 - 1);
                let tail = kb.iconst((k_all - (blocks - 1) * kc) as i64);
                let yes = kb.fb.ins().iconst(types::I8, 1);
                let p = pass_at(kb, last, KPass { len: tail, accumulate: Some(yes), last: true });
                columns(kb, mm, &p, n_lo, n, m, vector);
            }
        }
    });
}

/// Every output column in [start, n) for one K pass: column panels outside, row blocks inside,
/// so a panel of B (k x panel width) stays in cache while every row block of A streams past it.
#[allow(clippy::too_many_arguments)]
fn columns(kb: &mut Kb, mm: &MatMulKernel, ptrs: &Ptrs, start: Value, n: Value, m: Value, vector: bool) {
    let mut start = start;
    let shape = super::tiles::Tiles::for_target(kb.target);
    let (mr, nv) = (shape.f32_rows, shape.f32_vectors);
    if vector {
        // Wide panels: mr-row blocks as PANEL/nv tiles side by side; single rows (decode,
        // M = 1) as one 1 x PANEL tile, which reads whole cache lines of B per k step.
        start = kb.for_steps(start, n, 4 * PANEL as i64, |kb, j| {
            kb.row_blocks(m, mr, |kb, i, rows| {
                if rows == 1 {
                    return tiles(kb, mm, ptrs, i, j, 1, PANEL, true);
                }
                for t in 0..PANEL / nv {
                    let jt = kb.fb.ins().iadd_imm_s(j, (t * 4 * nv) as i64);
                    tiles(kb, mm, ptrs, i, jt, rows, nv, true);
                }
            })
        });
        start = kb.for_steps(start, n, 4 * nv as i64, |kb, j| row_blocks(kb, mm, ptrs, j, m, mr, nv, true));
        start = kb.for_steps(start, n, 4, |kb, j| row_blocks(kb, mm, ptrs, j, m, mr, 1, true));
    } else {
        start = kb.for_steps(start, n, 4, |kb, j| row_blocks(kb, mm, ptrs, j, m, MR, 4, false));
    }
    kb.for_range(start, n, 1, |kb, j| row_blocks(kb, mm, ptrs, j, m, MR, 1, false));
}

/// f32x4 vectors per column panel (16 floats: one 64-byte line of B per k step).
const PANEL: usize = 4;

/// Every row of the column panel starting at `j`: blocks of `mr` rows, then single rows.
#[allow(clippy::too_many_arguments)]
fn row_blocks(kb: &mut Kb, mm: &MatMulKernel, p: &Ptrs, j: Value, m: Value, mr: usize, width: usize, vector: bool) {
    kb.row_blocks(m, mr, |kb, i, rows| tiles(kb, mm, p, i, j, rows, width, vector));
}

/// The output tile at (i, j): one tile pass, or a SwiGLU tile's gate and up passes back to back.
#[allow(clippy::too_many_arguments)]
fn tiles(kb: &mut Kb, mm: &MatMulKernel, p: &Ptrs, i: Value, j: Value, rows: usize, width: usize, vector: bool) {
    for &st in mm.epi.stages() {
        tile(kb, mm, p, i, j, rows, width, vector, st);
    }
}

/// The output's column count as a run-time value.
fn n_all_cols(kb: &mut Kb, mm: &MatMulKernel) -> Value {
    kb.dim(&mm.n)
}

/// What one k step of a tile needs besides the pointers.
struct StepCtx<'m> {
    mm: &'m MatMulKernel,
    rows: usize,
    width: usize,
    vector: bool,
    integer: bool,
    acc_ty: Type,
    /// Byte offsets of the rows from one A pointer, when the row stride is fixed.
    row_imm: Option<Vec<i32>>,
    a_zps: Vec<Option<Value>>,
    b_zps: Vec<Option<Value>>,
    /// B's byte stride along n (scalar tiles).
    b_stride: Value,
    /// Multiply then add instead of fma (single-row tiles on x86 with AVX; see `tile`).
    split_fma: bool,
}

/// One k step: loads B's `width` values at `brow` and each row's A value, and returns the updated
/// accumulators.
fn step(kb: &mut Kb, c: &StepCtx, acc: &[Value], a_ptrs: &[Value], brow: Value) -> Vec<Value> {
    let mm = c.mm;
    let bv: Vec<Value> = (0..c.width)
        .map(|col| {
            if c.vector {
                kb.fb.ins().load(types::F32X4, mem_ro(), brow, (col * 16) as i32)
            } else {
                let off = kb.fb.ins().imul_imm_s(c.b_stride, col as i64);
                let addr = kb.fb.ins().iadd(brow, off);
                let v = load_elem(kb, mm.b.dtype, addr, 0);
                let v = if c.integer { cast(kb, v, mm.b.dtype, mm.out.dtype) } else { v };
                match c.b_zps[col] {
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
    for r in 0..c.rows {
        let (addr, imm) = match &c.row_imm {
            Some(offs) => (a_ptrs[0], offs[r]),
            None => (a_ptrs[r], 0),
        };
        let mut a = if c.vector {
            kb.fb.ins().load(types::F32, mem_ro(), addr, imm)
        } else {
            load_elem(kb, mm.a.dtype, addr, imm)
        };
        if c.integer {
            a = cast(kb, a, mm.a.dtype, mm.out.dtype);
            if let Some(z) = c.a_zps[r] {
                let z = cast(kb, z, mm.a_zero.as_ref().unwrap().1, mm.out.dtype);
                a = kb.fb.ins().isub(a, z);
            }
        }
        let av = if c.vector { kb.fb.ins().splat(types::F32X4, a) } else { a };
        for col in 0..c.width {
            let prev = acc[r * c.width + col];
            out.push(if c.integer {
                let t = kb.fb.ins().imul(av, bv[col]);
                kb.fb.ins().iadd(prev, t)
            } else if c.split_fma {
                let t = kb.fb.ins().fmul(av, bv[col]);
                kb.fb.ins().fadd(prev, t)
            } else {
                Fm::new(kb, c.acc_ty).fma(av, bv[col], prev)
            });
        }
    }
    out
}

/// One register tile: `rows` x `width` where width counts f32x4 vectors (`vector`) or scalars.
#[allow(clippy::too_many_arguments)]
fn tile(
    kb: &mut Kb,
    mm: &MatMulKernel,
    p: &Ptrs,
    i: Value,
    j: Value,
    rows: usize,
    width: usize,
    vector: bool,
    stage: Stage,
) {
    let integer = mm.a_zero.is_some() || mm.b_zero.is_some() || !mm.out.dtype.is_float();
    let acc_ty: Type = if vector { types::F32X4 } else { compute_type(mm.out.dtype) };
    let zero_acc = if acc_ty.is_int() { kb.fb.ins().iconst(acc_ty, 0) } else { Fm::new(kb, acc_ty).c(0.0) };
    let init = match p.pass.accumulate {
        None => vec![zero_acc; rows * width],
        // A later K block: the partial sums an earlier one stored (the first block of the loop
        // starts from zero; its output is not read as a number).
        Some(flag) => {
            let mut v = Vec::with_capacity(rows * width);
            for r in 0..rows {
                let row = out_row(kb, p, i, j, r);
                for c in 0..width {
                    let (addr, off) = out_elem(kb, p, row, c, vector);
                    let prev = kb.fb.ins().load(acc_ty, mem(), addr, off);
                    v.push(kb.fb.ins().select(flag, prev, zero_acc));
                }
            }
            v
        }
    };
    // Row pointers into A, the column pointer into B.
    let a_rows: Vec<Value> = (0..rows)
        .map(|r| {
            let ir = kb.fb.ins().iadd_imm_s(i, r as i64);
            let off = kb.fb.ins().imul(ir, p.s[0]);
            kb.fb.ins().iadd(p.a, off)
        })
        .collect();
    let b_col = if mm.b_packed {
        // Panel j/16 starts at (j/16) * K * 64 bytes; column j%16 is 4*(j%16) bytes into it.
        let panel = kb.fb.ins().ushr_imm_s(j, 4);
        let panel_bytes = kb.fb.ins().imul_imm_s(p.k, 64);
        let po = kb.fb.ins().imul(panel, panel_bytes);
        let within = kb.fb.ins().band_imm_s(j, 15);
        let wo = kb.fb.ins().ishl_imm_s(within, 2);
        let o = kb.fb.ins().iadd(po, wo);
        kb.fb.ins().iadd(p.b, o)
    } else {
        let jb = kb.fb.ins().imul(j, p.s[3]);
        kb.fb.ins().iadd(p.b, jb)
    };
    let b_col = if stage == Stage::Up { kb.fb.ins().iadd(b_col, p.up_off) } else { b_col };
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
    // With a fixed A row stride the rows are immediate offsets from one pointer (fewer live
    // registers); otherwise each row has its own pointer.
    let a_row_bytes = mm.a.strides[0].as_fixed().map(|s| s * mm.a.dtype.size() as i64);
    let row_imm: Option<Vec<i32>> =
        a_row_bytes.and_then(|b| (0..rows).map(|r| i32::try_from(b * r as i64).ok()).collect());
    let a_ptrs: Vec<Value> = if row_imm.is_some() { vec![a_rows[0]] } else { a_rows.clone() };
    let np = a_ptrs.len();
    // Multi-row tiles are throughput-bound: one fma per product. (x86 ties the fma's result to a
    // multiplicand, so the broadcast A is copied each time, but the copy is a register rename;
    // separate mul and add were 1.2x slower: 2.26 against 1.86 ms for 32x576 @ 576x1536.) A
    // single row (decode) waits on its four accumulators instead, and an add has half an fma's
    // latency: SmolLM2 fp32 decode 13.9 (fma) against 15.3 tok/s (mul + add), medians of 4.
    let split_fma = rows == 1 && kb.target.arch == edgec_runtime::Arch::X86_64 && kb.target.has("avx");
    let ctx = StepCtx { mm, rows, width, vector, integer, acc_ty, row_imm, a_zps, b_zps, b_stride: p.s[3], split_fma };
    // The k loop carries the accumulators and the A / B pointers, advanced by one k step each.
    let nacc = init.len();
    let mut state = init;
    state.extend(a_ptrs.iter().copied());
    state.push(b_col);
    let one = |kb: &mut Kb, st: &[Value]| {
        let (acc, ptrs) = st.split_at(nacc);
        let mut out = step(kb, &ctx, acc, &ptrs[..np], ptrs[np]);
        for &a in &ptrs[..np] {
            out.push(kb.fb.ins().iadd(a, p.s[1]));
        }
        out.push(kb.fb.ins().iadd(ptrs[np], p.s[2]));
        out
    };
    // Multi-row f32x4 tiles take `k_unroll` k steps per iteration (then single steps).
    let unroll = if vector && rows > 1 { super::tiles::Tiles::for_target(kb.target).k_unroll } else { 1 };
    let (end, state) = kb.fold_range(zero, p.pass.len, unroll as i64, &state, |kb, _, st| {
        (0..unroll).fold(st.to_vec(), |st, _| one(kb, &st))
    });
    let (_, fin) =
        if unroll > 1 { kb.fold_range(end, p.pass.len, 1, &state, |kb, _, st| one(kb, st)) } else { (end, state) };
    let accs = &fin[..nacc];
    let fused = p.pass.last && (mm.epi.act.is_some() || mm.epi.bias.is_some() || mm.epi.glu);
    for r in 0..rows {
        let row = out_row(kb, p, i, j, r);
        for c in 0..width {
            let mut v = accs[r * width + c];
            let (addr, off) = out_elem(kb, p, row, c, vector);
            if vector {
                if fused {
                    let col = kb.fb.ins().iadd_imm_s(j, (c * 4) as i64);
                    v = finish(kb, &mm.epi, stage, v, types::F32X4, col, addr, off);
                }
                kb.fb.ins().store(mem(), v, addr, off);
            } else {
                if fused {
                    let col = kb.fb.ins().iadd_imm_s(j, c as i64);
                    v = finish(kb, &mm.epi, stage, v, types::F32, col, addr, off);
                }
                store_elem(kb, mm.out.dtype, v, addr, off);
            }
        }
    }
}

/// The address of output row i + r at column j.
fn out_row(kb: &mut Kb, p: &Ptrs, i: Value, j: Value, r: usize) -> Value {
    let ir = kb.fb.ins().iadd_imm_s(i, r as i64);
    let off = kb.fb.ins().imul(ir, p.s[4]);
    let row = kb.fb.ins().iadd(p.out, off);
    let jo = kb.fb.ins().imul(j, p.s[5]);
    kb.fb.ins().iadd(row, jo)
}

/// Address and offset of a tile's output column `c` in `row` (an f32x4 of columns when `vector`).
fn out_elem(kb: &mut Kb, p: &Ptrs, row: Value, c: usize, vector: bool) -> (Value, i32) {
    if vector {
        (row, (c * 16) as i32)
    } else {
        let off = kb.fb.ins().imul_imm_s(p.s[5], c as i64);
        (kb.fb.ins().iadd(row, off), 0)
    }
}

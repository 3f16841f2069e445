//! Block-sparse f32 matmul: out[b, m, n] = sum_k A[b, m, k] * B[k, n] with B a pruned constant in
//! `SparseWeight` form (panels of four columns, only the k rows that are not all zero).
//!
//! Per panel the kernel walks its entries: load k, the four weights, and each row's A[k], then
//! one f32x4 fma per row (four scalar fmas without vectors). Tiles are `MR` rows by one panel;
//! single rows (decode) alternate two accumulators over entry pairs so consecutive fmas do not
//! wait on each other. Panels are the outer loop: a panel's entries stay in cache while every row
//! block of A streams past them. A SwiGLU weight computes the gate and the up panel of the same
//! columns back to back and stores act(gate) * up.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, InstBuilder, Type, Value};

use super::emit::{mem, mem_ro, Kb};
use super::layout::{SparsePanels, SparseWeight, SPARSE_COLS};
use super::math::Fm;
use super::matmul::{column_range, finish, MatMulKernel, Stage, MR};

/// What every tile of one batch slice needs.
struct Ctx<'m> {
    mm: &'m MatMulKernel,
    sw: &'m SparseWeight,
    /// B's packed bytes.
    b: Value,
    a: Value,
    out: Value,
    /// Byte strides: A along m, A along k, out along m.
    a_m: Value,
    a_k: Value,
    out_m: Value,
    /// f32x4 accumulators (else four f32 per row).
    vector: bool,
}

impl Ctx<'_> {
    /// The accumulator type and accumulators per row.
    fn acc_shape(&self) -> (Type, usize) {
        if self.vector {
            (types::F32X4, 1)
        } else {
            (types::F32, SPARSE_COLS)
        }
    }
}

/// One panel's entries: their count and the addresses of the first k index and weight row.
struct Entries {
    count: Value,
    idx: Value,
    vals: Value,
}

/// The matmul restricted to the column units `units` (`None`: every column).
pub fn emit(kb: &mut Kb, mm: &MatMulKernel, sw: &SparseWeight, units: Option<(Value, Value)>) {
    let batch: Vec<Value> = mm.batch.iter().map(|d| kb.dim(d)).collect();
    let strides: Vec<Vec<Value>> =
        [&mm.a, &mm.out].iter().map(|o| o.batch_strides.iter().map(|d| kb.dim(d)).collect()).collect();
    let bases = [kb.base(mm.a.loc), kb.base(mm.out.loc)];
    let b = kb.base(mm.b.loc);
    let m = kb.dim(&mm.m);
    let (lo, hi) = column_range(kb, mm, units);
    let bytes = |kb: &mut Kb, d| {
        let v = kb.dim(d);
        kb.fb.ins().imul_imm_s(v, 4)
    };
    let (a_m, a_k, out_m) = (bytes(kb, &mm.a.strides[0]), bytes(kb, &mm.a.strides[1]), bytes(kb, &mm.out.strides[0]));
    let vector = kb.target.simd();
    // Units start on multiples of 16 columns, so on whole panels; the last panel may be partial.
    let p_lo = kb.fb.ins().ushr_imm_s(lo, 2);
    let p_hi = kb.fb.ins().iadd_imm_s(hi, SPARSE_COLS as i64 - 1);
    let p_hi = kb.fb.ins().ushr_imm_s(p_hi, 2);
    let n = sw.gate.n;
    let full = (n / SPARSE_COLS) as i64;
    let full_v = kb.iconst(full);
    let p_full = kb.fb.ins().smin(p_hi, full_v);
    let zero = kb.iconst(0);
    kb.loop_nest(&batch, &strides, vec![zero; 2], &mut Vec::new(), &mut |kb, offs, _| {
        let a = kb.elem_addr(bases[0], offs[0], 4);
        let out = kb.elem_addr(bases[1], offs[1], 4);
        let c = Ctx { mm, sw, b, a, out, a_m, a_k, out_m, vector };
        kb.for_range(p_lo, p_full, 1, |kb, p| panel(kb, &c, p, m, SPARSE_COLS));
        if !n.is_multiple_of(SPARSE_COLS) {
            // The partial last panel, when it is in this unit's range.
            let tail = kb.fb.ins().icmp_imm_s(IntCC::SignedGreaterThan, p_hi, full);
            kb.if_then(tail, |kb| {
                let p = kb.iconst(full);
                panel(kb, &c, p, m, n % SPARSE_COLS)
            });
        }
    });
}

/// Panel `p`'s entries in the `SparsePanels` at byte `offset` of B.
fn entries(kb: &mut Kb, c: &Ctx, sp: &SparsePanels, offset: usize, p: Value) -> Entries {
    let base = kb.fb.ins().iadd_imm_s(c.b, offset as i64);
    let start = kb.fb.ins().ishl_imm_s(p, 2);
    let start = kb.fb.ins().iadd(base, start);
    let e0 = kb.fb.ins().uload32(mem(), start, 0);
    let e1 = kb.fb.ins().uload32(mem(), start, 4);
    let count = kb.fb.ins().isub(e1, e0);
    let io = kb.fb.ins().ishl_imm_s(e0, 2);
    let io = kb.fb.ins().iadd_imm_s(io, sp.index_offset() as i64);
    let idx = kb.fb.ins().iadd(base, io);
    let vo = kb.fb.ins().ishl_imm_s(e0, 4);
    let vo = kb.fb.ins().iadd_imm_s(vo, sp.values_offset() as i64);
    let vals = kb.fb.ins().iadd(base, vo);
    Entries { count, idx, vals }
}

/// Every row of panel `p` (`cols` of its columns are real): `MR`-row tiles, then single rows.
fn panel(kb: &mut Kb, c: &Ctx, p: Value, m: Value, cols: usize) {
    let gate = entries(kb, c, &c.sw.gate, 0, p);
    let up = c.sw.up.map(|u| entries(kb, c, &u, c.sw.up_offset(), p));
    let j = kb.fb.ins().ishl_imm_s(p, 2);
    kb.row_blocks(m, MR, |kb, i, rows| tile(kb, c, i, j, rows, cols, &gate, up.as_ref()));
}

/// The tile of `rows` rows from `i` by the panel at column `j`.
#[allow(clippy::too_many_arguments)]
fn tile(kb: &mut Kb, c: &Ctx, i: Value, j: Value, rows: usize, cols: usize, gate: &Entries, up: Option<&Entries>) {
    let a_rows: Vec<Value> = (0..rows)
        .map(|r| {
            let ir = kb.fb.ins().iadd_imm_s(i, r as i64);
            let off = kb.fb.ins().imul(ir, c.a_m);
            kb.fb.ins().iadd(c.a, off)
        })
        .collect();
    let acc = accumulate(kb, c, &a_rows, gate);
    let up = up.map(|u| accumulate(kb, c, &a_rows, u));
    store(kb, c, &acc, up.as_deref(), i, j, rows, cols);
}

/// The panel's products for the rows at `a_rows`: `rows` x accumulators per row.
fn accumulate(kb: &mut Kb, c: &Ctx, a_rows: &[Value], e: &Entries) -> Vec<Value> {
    let (ty, per_row) = c.acc_shape();
    let nacc = a_rows.len() * per_row;
    let zero_acc = Fm::new(kb, ty).c(0.0);
    let zero = kb.iconst(0);
    // Single rows: two accumulator sets over entry pairs, then the odd entry into the first.
    let sets = if a_rows.len() == 1 { 2 } else { 1 };
    let mut state = vec![zero_acc; sets * nacc];
    state.extend([e.idx, e.vals]);
    let (done, st) = kb.fold_range(zero, e.count, sets as i64, &state, |kb, _, st| {
        let (acc, ptrs) = st.split_at(sets * nacc);
        let (mut ip, mut vp) = (ptrs[0], ptrs[1]);
        let mut out = Vec::new();
        for s in 0..sets {
            out.extend(entry(kb, c, &acc[s * nacc..(s + 1) * nacc], a_rows, ip, vp));
            ip = kb.fb.ins().iadd_imm_s(ip, 4);
            vp = kb.fb.ins().iadd_imm_s(vp, 16);
        }
        out.extend([ip, vp]);
        out
    });
    if sets == 1 {
        return st[..nacc].to_vec();
    }
    let acc: Vec<Value> = (0..nacc).map(|x| Fm::new(kb, ty).add(st[x], st[nacc + x])).collect::<Vec<_>>();
    // The odd entry, through the join block's parameters.
    let (ip, vp) = (st[2 * nacc], st[2 * nacc + 1]);
    let odd = kb.fb.ins().icmp(IntCC::SignedLessThan, done, e.count);
    let then_b = kb.fb.create_block();
    let join = kb.fb.create_block();
    for _ in 0..nacc {
        kb.fb.append_block_param(join, ty);
    }
    let args: Vec<_> = acc.iter().map(|&v| v.into()).collect();
    kb.fb.ins().brif(odd, then_b, &[], join, &args);
    kb.fb.switch_to_block(then_b);
    let upd = entry(kb, c, &acc, a_rows, ip, vp);
    let args: Vec<_> = upd.iter().map(|&v| v.into()).collect();
    kb.fb.ins().jump(join, &args);
    kb.fb.switch_to_block(join);
    kb.fb.block_params(join).to_vec()
}

/// One entry into `acc`: k, the weights, each row's A[k].
fn entry(kb: &mut Kb, c: &Ctx, acc: &[Value], a_rows: &[Value], idx: Value, vals: Value) -> Vec<Value> {
    let (ty, per_row) = c.acc_shape();
    let k = kb.fb.ins().uload32(mem_ro(), idx, 0);
    let ko = kb.fb.ins().imul(k, c.a_k);
    let w: Vec<Value> = (0..per_row).map(|l| kb.fb.ins().load(ty, mem_ro(), vals, (4 * l) as i32)).collect();
    let mut out = Vec::with_capacity(acc.len());
    for (r, &row) in a_rows.iter().enumerate() {
        let addr = kb.fb.ins().iadd(row, ko);
        let a = kb.fb.ins().load(types::F32, mem_ro(), addr, 0);
        let a = if c.vector { kb.fb.ins().splat(types::F32X4, a) } else { a };
        for (l, &wl) in w.iter().enumerate() {
            let prev = acc[r * per_row + l];
            out.push(Fm::new(kb, ty).fma(a, wl, prev));
        }
    }
    out
}

/// Stores a tile (bias and activation applied, or act(gate) * up): whole f32x4 for a full panel,
/// else the `cols` real lanes one by one.
#[allow(clippy::too_many_arguments)]
fn store(kb: &mut Kb, c: &Ctx, acc: &[Value], up: Option<&[Value]>, i: Value, j: Value, rows: usize, cols: usize) {
    let (ty, per_row) = c.acc_shape();
    let epi = &c.mm.epi;
    let fused = epi.act.is_some() || epi.bias.is_some();
    // The value to store for accumulator value `v` (type `t`) at column `col`, address `addr`.
    let value = |kb: &mut Kb, v: Value, upv: Option<Value>, t: Type, col: Value, addr: Value| match upv {
        Some(u) => {
            let g = finish(kb, epi, Stage::Gate, v, t, col, addr, 0);
            kb.fb.ins().fmul(g, u)
        }
        None if fused => finish(kb, epi, Stage::Plain, v, t, col, addr, 0),
        None => v,
    };
    for r in 0..rows {
        let ir = kb.fb.ins().iadd_imm_s(i, r as i64);
        let off = kb.fb.ins().imul(ir, c.out_m);
        let row = kb.fb.ins().iadd(c.out, off);
        let jo = kb.fb.ins().ishl_imm_s(j, 2);
        let row = kb.fb.ins().iadd(row, jo);
        if c.vector && cols == SPARSE_COLS {
            let v = value(kb, acc[r], up.map(|u| u[r]), ty, j, row);
            kb.fb.ins().store(mem(), v, row, 0);
            continue;
        }
        for l in 0..cols {
            let lane = |kb: &mut Kb, x: &[Value]| {
                if c.vector {
                    kb.fb.ins().extractlane(x[r], l as u8)
                } else {
                    x[r * per_row + l]
                }
            };
            let v = lane(kb, acc);
            let upv = up.map(|u| lane(kb, u));
            let col = kb.fb.ins().iadd_imm_s(j, l as i64);
            let addr = kb.fb.ins().iadd_imm_s(row, (4 * l) as i64);
            let v = value(kb, v, upv, types::F32, col, addr);
            kb.fb.ins().store(mem(), v, addr, 0);
        }
    }
}

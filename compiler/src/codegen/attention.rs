//! Fused attention (`Op::Attention`): `softmax(q k^T * scale + mask) v` without the score matrix.
//!
//! One unit of work is (batch, a pass of up to `MAX_HEADS` query heads that share a kv head, one
//! query row). It streams the kv head's keys once for all heads of the pass (flash-attention's
//! online softmax): per block of `KEYS` keys and per head, the dot products (f32x4 over head_dim),
//! scale and mask, the new running max, `alpha = exp(old_max - new_max)`, the block's
//! probabilities as f32x4 `exp`s, and `out = out * alpha + sum p_j v_j` on the output row,
//! which serves as the accumulator. A last pass divides by the running sum. Keys past the last
//! whole block go 4 and then 1 at a time; on targets without vectors every key goes alone.
//!
//! Units are independent, so large attentions run through the runtime's `parallel_for` like
//! matmuls do (see `units_and_work`).

use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::{types, InstBuilder, Type, Value};

use super::emit::{mem, Kb, Loc};
use super::map::View;
use super::math::Fm;
use crate::ir::Dim;

#[derive(Clone, Debug)]
pub struct AttentionKernel {
    pub batch: Dim,
    pub q_heads: usize,
    pub kv_heads: usize,
    /// Query rows, keys, head size of q/k and of v.
    pub s: Dim,
    pub t: Dim,
    pub d: Dim,
    pub dv: Dim,
    /// Rows from one (batch, kv head) of k and of v to the next: `t` when dense, the capacity
    /// when they live in a KV-cache region.
    pub k_rows: Dim,
    pub v_rows: Dim,
    /// Dense f32 tensors: q [b, hq, s, d], k [b, hkv, t, d], v [b, hkv, t, dv], out [b, hq, s, dv].
    pub q: Loc,
    pub k: Loc,
    pub v: Loc,
    pub out: Loc,
    /// Additive f32 mask with element strides over [b, hq, s, t] (0 where it broadcasts).
    pub mask: Option<View>,
    pub scale: f32,
}

/// Keys per block: two f32x4 of scores (8 dot-product accumulators + q + k fit x86's 16 vector
/// registers; the per-block rescale of the output row is amortised over 8 keys).
const KEYS: i64 = 8;
/// Query heads per pass over a kv head (their running max and sum stay in registers).
const MAX_HEADS: usize = 4;

impl AttentionKernel {
    /// Every buffer location the kernel reads or writes (for `emit::parameterise`).
    pub fn locs_mut(&mut self) -> Vec<&mut Loc> {
        let mut v = vec![&mut self.q, &mut self.k, &mut self.v, &mut self.out];
        v.extend(self.mask.as_mut().map(|m| &mut m.loc));
        v
    }

    fn group(&self) -> usize {
        self.q_heads / self.kv_heads
    }
    /// Heads per pass: the largest divisor of the group up to `MAX_HEADS`.
    fn heads_per_pass(&self) -> usize {
        let g = self.group();
        (1..=MAX_HEADS.min(g)).rev().find(|&h| g.is_multiple_of(h)).unwrap_or(1)
    }
    fn passes(&self) -> usize {
        self.q_heads / self.heads_per_pass()
    }
}

/// Parallel units (batch x head passes x query rows) and multiply-adds, at run time.
pub fn units_and_work(kb: &mut Kb, ak: &AttentionKernel) -> (Value, Value) {
    let b = kb.dim(&ak.batch);
    let s = kb.dim(&ak.s);
    let t = kb.dim(&ak.t);
    let d = kb.dim(&ak.d);
    let dv = kb.dim(&ak.dv);
    let bs = kb.fb.ins().imul(b, s);
    let units = kb.fb.ins().imul_imm_s(bs, ak.passes() as i64);
    let rows = kb.fb.ins().imul_imm_s(bs, ak.q_heads as i64);
    let dd = kb.fb.ins().iadd(d, dv);
    let per_row = kb.fb.ins().imul(t, dd);
    let work = kb.fb.ins().imul(rows, per_row);
    (units, work)
}

/// Run-time values every unit uses.
struct Cx {
    s: Value,
    t: Value,
    d: Value,
    dv: Value,
    k_rows: Value,
    v_rows: Value,
    /// Bases of q, k, v, out, mask.
    q: Value,
    k: Value,
    v: Value,
    out: Value,
    mask: Option<(Value, [Value; 4])>,
    vector: bool,
}

fn splat4(kb: &mut Kb, x: Value) -> Value {
    kb.fb.ins().splat(types::F32X4, x)
}

/// Lanes of an f32x4 combined with `f` (sum or max).
fn reduce4(kb: &mut Kb, v: Value, max: bool) -> Value {
    let mut acc = kb.fb.ins().extractlane(v, 0);
    for lane in 1..4u8 {
        let x = kb.fb.ins().extractlane(v, lane);
        acc = if max { kb.fb.ins().fmax(acc, x) } else { kb.fb.ins().fadd(acc, x) };
    }
    acc
}

/// `base + i * stride_bytes`.
fn addr(kb: &mut Kb, base: Value, i: Value, stride_bytes: Value) -> Value {
    let o = kb.fb.ins().imul(i, stride_bytes);
    kb.fb.ins().iadd(base, o)
}

/// Dot products of the q row with `n` consecutive key rows starting at `krow` (byte stride
/// `kstride`): f32x4 accumulators over head_dim, then a scalar tail.
fn dots(kb: &mut Kb, cx: &Cx, qrow: Value, krow: Value, kstride: Value, n: usize) -> Vec<Value> {
    let zero = kb.iconst(0);
    let mut sums = Vec::with_capacity(n);
    let mut start = zero;
    let krows: Vec<Value> = (0..n)
        .map(|j| {
            let jj = kb.iconst(j as i64);
            addr(kb, krow, jj, kstride)
        })
        .collect();
    if cx.vector {
        let z = Fm::new(kb, types::F32X4).c(0.0);
        let (end, accs) = kb.fold_range(zero, cx.d, 4, &vec![z; n], |kb, c, a| {
            let off = kb.fb.ins().imul_imm_s(c, 4);
            let qa = kb.fb.ins().iadd(qrow, off);
            let qv = kb.fb.ins().load(types::F32X4, mem(), qa, 0);
            (0..n)
                .map(|j| {
                    let ka = kb.fb.ins().iadd(krows[j], off);
                    let kv = kb.fb.ins().load(types::F32X4, mem(), ka, 0);
                    Fm::new(kb, types::F32X4).fma(qv, kv, a[j])
                })
                .collect()
        });
        start = end;
        for a in accs {
            sums.push(reduce4(kb, a, false));
        }
    } else {
        for _ in 0..n {
            sums.push(Fm::new(kb, types::F32).c(0.0));
        }
    }
    let (_, sums) = kb.fold_range(start, cx.d, 1, &sums, |kb, c, a| {
        let off = kb.fb.ins().imul_imm_s(c, 4);
        let qa = kb.fb.ins().iadd(qrow, off);
        let qv = kb.fb.ins().load(types::F32, mem(), qa, 0);
        (0..n)
            .map(|j| {
                let ka = kb.fb.ins().iadd(krows[j], off);
                let kv = kb.fb.ins().load(types::F32, mem(), ka, 0);
                Fm::new(kb, types::F32).fma(qv, kv, a[j])
            })
            .collect()
    });
    sums
}

/// `orow = orow * alpha + sum_j p[j] * v_row(j)` over dv (f32x4, then a scalar tail).
fn accumulate(kb: &mut Kb, cx: &Cx, orow: Value, alpha: Value, p: &[Value], vrow: Value, vstride: Value) {
    let zero = kb.iconst(0);
    let vrows: Vec<Value> = (0..p.len())
        .map(|j| {
            let jj = kb.iconst(j as i64);
            addr(kb, vrow, jj, vstride)
        })
        .collect();
    let mut start = zero;
    let body = |kb: &mut Kb, c: Value, ty: Type, alpha: Value, p: &[Value]| {
        let off = kb.fb.ins().imul_imm_s(c, 4);
        let oa = kb.fb.ins().iadd(orow, off);
        let mut o = kb.fb.ins().load(ty, mem(), oa, 0);
        o = kb.fb.ins().fmul(o, alpha);
        for (j, &pj) in p.iter().enumerate() {
            let va = kb.fb.ins().iadd(vrows[j], off);
            let vv = kb.fb.ins().load(ty, mem(), va, 0);
            o = Fm::new(kb, ty).fma(pj, vv, o);
        }
        kb.fb.ins().store(mem(), o, oa, 0);
    };
    if cx.vector {
        let alpha4 = splat4(kb, alpha);
        let p4: Vec<Value> = p.iter().map(|&x| splat4(kb, x)).collect();
        start = kb.for_steps(zero, cx.dv, 4, |kb, c| body(kb, c, types::F32X4, alpha4, &p4));
    }
    kb.for_range(start, cx.dv, 1, |kb, c| body(kb, c, types::F32, alpha, p));
}

/// One step of the online softmax for one head over `n` keys starting at key `j`: returns the
/// new (max, sum).
#[allow(clippy::too_many_arguments)]
fn step(
    kb: &mut Kb,
    cx: &Cx,
    ak: &AttentionKernel,
    rows: &HeadRows,
    j: Value,
    n: usize,
    m: Value,
    l: Value,
) -> (Value, Value) {
    let masks: Option<Vec<Value>> = match (rows.mask, cx.mask) {
        (Some(mrow), Some((_, st))) => {
            let sb = kb.fb.ins().imul_imm_s(st[3], 4);
            let m0 = addr(kb, mrow, j, sb);
            Some(
                (0..n)
                    .map(|i| {
                        let ii = kb.iconst(i as i64);
                        let a = addr(kb, m0, ii, sb);
                        kb.fb.ins().load(types::F32, mem(), a, 0)
                    })
                    .collect(),
            )
        }
        _ => None,
    };
    let ms = match masks {
        Some(ms) if n > 1 => ms,
        other => return step_keys(kb, cx, ak, rows, j, n, m, l, other.as_deref()),
    };
    // A block whose mask is "minus infinity" everywhere adds exp(-huge) ~ 0 once a real score set
    // the running max (causal masks in prefill: half the keys): skip it. While the max is itself
    // masked, masked keys still count, as in the reference (a fully masked row averages v).
    let lim = Fm::new(kb, types::F32).c(MASKED);
    let real = Fm::new(kb, types::F32).c(REAL_MAX);
    let mut all = kb.fb.ins().fcmp(FloatCC::LessThanOrEqual, ms[0], lim);
    for &x in &ms[1..] {
        let c = kb.fb.ins().fcmp(FloatCC::LessThanOrEqual, x, lim);
        all = kb.fb.ins().band(all, c);
    }
    let seen = kb.fb.ins().fcmp(FloatCC::GreaterThan, m, real);
    let skip = kb.fb.ins().band(all, seen);
    let work = kb.fb.create_block();
    let join = kb.fb.create_block();
    kb.fb.append_block_param(join, types::F32);
    kb.fb.append_block_param(join, types::F32);
    kb.fb.ins().brif(skip, join, &[m.into(), l.into()], work, &[]);
    kb.fb.switch_to_block(work);
    let (m2, l2) = step_keys(kb, cx, ak, rows, j, n, m, l, Some(&ms));
    kb.fb.ins().jump(join, &[m2.into(), l2.into()]);
    kb.fb.switch_to_block(join);
    let p = kb.fb.block_params(join);
    (p[0], p[1])
}

/// Mask values at or below this are minus infinity for the skip test...
const MASKED: f64 = -1e30;
/// ...once the running max is above this (so `score + mask - max` is far below exp's range).
const REAL_MAX: f64 = -1e20;

/// `step` on keys known to need computing; `masks` are their mask values (loaded when absent).
#[allow(clippy::too_many_arguments)]
fn step_keys(
    kb: &mut Kb,
    cx: &Cx,
    ak: &AttentionKernel,
    rows: &HeadRows,
    j: Value,
    n: usize,
    m: Value,
    l: Value,
    masks: Option<&[Value]>,
) -> (Value, Value) {
    let kstride = kb.fb.ins().imul_imm_s(cx.d, 4);
    let vstride = kb.fb.ins().imul_imm_s(cx.dv, 4);
    let krow = addr(kb, rows.k, j, kstride);
    let vrow = addr(kb, rows.v, j, vstride);
    let dots = dots(kb, cx, rows.q, krow, kstride, n);
    let scale = Fm::new(kb, types::F32).c(ak.scale as f64);
    let mut scores: Vec<Value> = dots.iter().map(|&x| kb.fb.ins().fmul(x, scale)).collect();
    match masks {
        Some(ms) => {
            for (sc, &mv) in scores.iter_mut().zip(ms) {
                *sc = kb.fb.ins().fadd(*sc, mv);
            }
        }
        None => {
            if let (Some(mrow), Some((_, st))) = (rows.mask, cx.mask) {
                let sb = kb.fb.ins().imul_imm_s(st[3], 4);
                let m0 = addr(kb, mrow, j, sb);
                for (i, sc) in scores.iter_mut().enumerate() {
                    let ii = kb.iconst(i as i64);
                    let a = addr(kb, m0, ii, sb);
                    let mv = kb.fb.ins().load(types::F32, mem(), a, 0);
                    *sc = kb.fb.ins().fadd(*sc, mv);
                }
            }
        }
    }
    // Running max first, then the block's probabilities relative to it.
    let (mn, pv): (Value, Vec<Value>);
    if n.is_multiple_of(4) && cx.vector {
        // Scores as f32x4 vectors: one max reduction and one vector exp per 4 keys.
        let svs: Vec<Value> = scores
            .chunks(4)
            .map(|c| {
                let mut sv = splat4(kb, c[0]);
                for (i, &x) in c.iter().enumerate().skip(1) {
                    sv = kb.fb.ins().insertlane(sv, x, i as u8);
                }
                sv
            })
            .collect();
        let vmax = svs.iter().skip(1).fold(svs[0], |a, &x| kb.fb.ins().fmax(a, x));
        let bmax = reduce4(kb, vmax, true);
        mn = kb.fb.ins().fmax(m, bmax);
        let mn4 = splat4(kb, mn);
        let mut lanes = Vec::with_capacity(n);
        for sv in svs {
            let dlt = kb.fb.ins().fsub(sv, mn4);
            let p = Fm::new(kb, types::F32X4).exp(dlt);
            lanes.extend((0..4u8).map(|i| kb.fb.ins().extractlane(p, i)));
        }
        pv = lanes;
    } else {
        let bmax = scores.iter().skip(1).fold(scores[0], |a, &x| kb.fb.ins().fmax(a, x));
        mn = kb.fb.ins().fmax(m, bmax);
        pv = scores
            .iter()
            .map(|&x| {
                let dlt = kb.fb.ins().fsub(x, mn);
                Fm::new(kb, types::F32).exp(dlt)
            })
            .collect();
    }
    let dm = kb.fb.ins().fsub(m, mn);
    let alpha = Fm::new(kb, types::F32).exp(dm);
    let psum = pv.iter().skip(1).fold(pv[0], |a, &x| kb.fb.ins().fadd(a, x));
    let la = kb.fb.ins().fmul(l, alpha);
    let l2 = kb.fb.ins().fadd(la, psum);
    accumulate(kb, cx, rows.o, alpha, &pv, vrow, vstride);
    (mn, l2)
}

/// Row pointers of one head in one unit.
#[derive(Clone, Copy)]
struct HeadRows {
    q: Value,
    o: Value,
    /// Key and value row 0 of the kv head.
    k: Value,
    v: Value,
    mask: Option<Value>,
}

/// The whole attention, or the units `[begin, end)` of it (a `parallel_for` task).
pub fn emit_attention(kb: &mut Kb, ak: &AttentionKernel, units: Option<(Value, Value)>) {
    let (b, s, t, d, dv) = (kb.dim(&ak.batch), kb.dim(&ak.s), kb.dim(&ak.t), kb.dim(&ak.d), kb.dim(&ak.dv));
    let (q, k, v, out) = (kb.base(ak.q), kb.base(ak.k), kb.base(ak.v), kb.base(ak.out));
    let mask = ak.mask.as_ref().map(|m| {
        let base = kb.base(m.loc);
        let off = kb.dim(&m.offset);
        let base = kb.elem_addr(base, off, 4);
        let st: Vec<Value> = m.strides.iter().map(|d| kb.dim(d)).collect();
        (base, [st[0], st[1], st[2], st[3]])
    });
    let (k_rows, v_rows) = (kb.dim(&ak.k_rows), kb.dim(&ak.v_rows));
    let cx = Cx { s, t, d, dv, k_rows, v_rows, q, k, v, out, mask, vector: kb.target.simd() };
    let (begin, end) = match units {
        Some(r) => r,
        None => {
            let zero = kb.iconst(0);
            let bs = kb.fb.ins().imul(b, s);
            (zero, kb.fb.ins().imul_imm_s(bs, ak.passes() as i64))
        }
    };
    let hp = ak.heads_per_pass();
    kb.for_range(begin, end, 1, |kb, u| {
        // u = (bi * passes + pass) * s + i
        let i = kb.fb.ins().urem(u, cx.s);
        let rest = kb.fb.ins().udiv(u, cx.s);
        let pass = kb.fb.ins().urem_imm_s(rest, ak.passes() as i64);
        let bi = kb.fb.ins().udiv_imm_s(rest, ak.passes() as i64);
        let h0 = kb.fb.ins().imul_imm_s(pass, hp as i64);
        let kh = kb.fb.ins().udiv_imm_s(h0, ak.group() as i64);
        // kv head row 0: ((bi * hkv + kh) * rows) rows of d / dv floats (rows = t when dense).
        let bk = kb.fb.ins().imul_imm_s(bi, ak.kv_heads as i64);
        let bk = kb.fb.ins().iadd(bk, kh);
        let krow0 = kb.fb.ins().imul(bk, cx.k_rows);
        let kd = kb.fb.ins().imul(krow0, cx.d);
        let kbase = kb.elem_addr(cx.k, kd, 4);
        let vrow0 = kb.fb.ins().imul(bk, cx.v_rows);
        let vd = kb.fb.ins().imul(vrow0, cx.dv);
        let vbase = kb.elem_addr(cx.v, vd, 4);
        let rows: Vec<HeadRows> = (0..hp)
            .map(|r| {
                let h = kb.fb.ins().iadd_imm_s(h0, r as i64);
                let bh = kb.fb.ins().imul_imm_s(bi, ak.q_heads as i64);
                let bh = kb.fb.ins().iadd(bh, h);
                let row = kb.fb.ins().imul(bh, cx.s);
                let row = kb.fb.ins().iadd(row, i);
                let qo = kb.fb.ins().imul(row, cx.d);
                let qa = kb.elem_addr(cx.q, qo, 4);
                let oo = kb.fb.ins().imul(row, cx.dv);
                let oa = kb.elem_addr(cx.out, oo, 4);
                let mask = cx.mask.map(|(base, st)| {
                    let mut off = kb.fb.ins().imul(bi, st[0]);
                    for (x, s) in [(h, st[1]), (i, st[2])] {
                        let p = kb.fb.ins().imul(x, s);
                        off = kb.fb.ins().iadd(off, p);
                    }
                    kb.elem_addr(base, off, 4)
                });
                HeadRows { q: qa, o: oa, k: kbase, v: vbase, mask }
            })
            .collect();
        // The output rows accumulate: start at zero.
        let zero = kb.iconst(0);
        for r in &rows {
            let z = Fm::new(kb, types::F32).c(0.0);
            let o = r.o;
            kb.for_range(zero, cx.dv, 1, |kb, c| {
                let a = kb.elem_addr(o, c, 4);
                kb.fb.ins().store(mem(), z, a, 0);
            });
        }
        let lowest = Fm::new(kb, types::F32).c(f32::MIN as f64);
        let zf = Fm::new(kb, types::F32).c(0.0);
        let mut init = Vec::new();
        for _ in 0..hp {
            init.extend([lowest, zf]);
        }
        let run = |kb: &mut Kb, j: Value, a: &[Value], n: usize| -> Vec<Value> {
            let mut next = Vec::with_capacity(a.len());
            for (r, row) in rows.iter().enumerate() {
                let (m, l) = step(kb, &cx, ak, row, j, n, a[2 * r], a[2 * r + 1]);
                next.extend([m, l]);
            }
            next
        };
        let (mut j, mut state) = (zero, init);
        if cx.vector {
            (j, state) = kb.fold_range(zero, cx.t, KEYS, &state, |kb, j, a| run(kb, j, a, KEYS as usize));
            (j, state) = kb.fold_range(j, cx.t, 4, &state, |kb, j, a| run(kb, j, a, 4));
        }
        let (_, state) = kb.fold_range(j, cx.t, 1, &state, |kb, j, a| run(kb, j, a, 1));
        for (r, row) in rows.iter().enumerate() {
            // No keys (t = 0): the sum is 0 and the row stays 0, as in the reference.
            let one = Fm::new(kb, types::F32).c(1.0);
            let zf = Fm::new(kb, types::F32).c(0.0);
            let l = state[2 * r + 1];
            let inv = kb.fb.ins().fdiv(one, l);
            let empty = kb.fb.ins().fcmp(FloatCC::Equal, l, zf);
            let inv = kb.fb.ins().select(empty, zf, inv);
            accumulate(kb, &cx, row.o, inv, &[], row.v, zero);
        }
    });
}

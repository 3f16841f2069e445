//! Attention fusion: `softmax(q @ k^T * scale + mask) @ v` as exporters write it becomes one
//! `Attention` op (see `Op::Attention`), which native code runs without materialising the
//! [b, h, s, t] score matrix (codegen/attention.rs).
//!
//! Matched, from the final MatMul upwards:
//! - Softmax over the last axis (identity Casts / inference Dropout around it);
//! - between Softmax and `q @ k^T`: scalar Mul/Div (the scale), Add of a mask, and
//!   Where(cond, scores, very negative constant) (a boolean mask; it becomes the additive mask
//!   Where(cond, 0, constant), equal because `s + c` rounds to `c` for |c| >= 1e30);
//! - a scalar Mul on q or k before the product (folded into the scale);
//! - k^T as Transpose(k) with any permutation (k in another layout gets its own Transpose);
//! - GQA's repeat_kv, Reshape(Expand(Unsqueeze(k, [2]))), on k and v: the fused op reads the kv
//!   heads directly (query head h uses kv head h / groups).
//!
//! Only f32 graphs are fused (what the native kernel implements). A mask applied before a scale
//! would be scaled too; that order is left alone.

use super::pattern::{arg, both_orders, fuse_nodes, op, scalar, shape, single_use, skip_identity};
use super::{Pass, PassStats};
use crate::error::Result;
use crate::ir::{BinaryOp, DType, Dim, Graph, Op, Tensor, TensorType, Value, ValueRef};
use std::collections::HashMap;

pub struct FuseAttention;

/// Additive masks at or below this are "minus infinity": `s + c == c` in f32 for any score.
const VERY_NEGATIVE: f64 = -1e30;

enum MaskTerm {
    Add(ValueRef),
    /// Where(cond, scores, c) (`scores_if_true`) or Where(cond, c, scores).
    Where {
        cond: ValueRef,
        c: ValueRef,
        scores_if_true: bool,
    },
}

/// How k reaches the product: directly, or through a new Transpose of a value.
enum KSource {
    Value(ValueRef),
    Transpose(ValueRef, Vec<i64>),
}

struct Found {
    out: ValueRef,
    q: ValueRef,
    k: KSource,
    v: ValueRef,
    scale: f64,
    masks: Vec<MaskTerm>,
}

fn rank4(g: &Graph, v: ValueRef) -> Option<&[Dim]> {
    shape(g, v).filter(|s| s.len() == 4)
}

/// A positive scalar multiplier: Mul(x, c) -> (x, c), Div(x, c) -> (x, 1/c).
fn scaled(g: &Graph, v: ValueRef) -> Option<(ValueRef, f64)> {
    match op(g, v) {
        Op::Binary(BinaryOp::Mul) => {
            both_orders(g, v)?.into_iter().find_map(|(x, c)| scalar(g, c).filter(|&c| c > 0.0).map(|c| (x, c)))
        }
        Op::Binary(BinaryOp::Div) => {
            let c = scalar(g, arg(g, v, 1)?).filter(|&c| c > 0.0)?;
            Some((arg(g, v, 0)?, 1.0 / c))
        }
        _ => None,
    }
}

/// Whether `v`'s chain reaches a rank-4 MatMul through scale/mask ops (which side of an Add is
/// the scores).
fn reaches_scores(g: &Graph, v: ValueRef, depth: usize) -> bool {
    let Some(v) = skip_identity(g, v, true) else { return false };
    if depth == 0 || !single_use(g, v) {
        return false;
    }
    match op(g, v) {
        Op::MatMul => rank4(g, v).is_some(),
        Op::Binary(BinaryOp::Mul | BinaryOp::Div | BinaryOp::Add) | Op::Where => {
            (0..3).filter_map(|i| arg(g, v, i)).any(|a| reaches_scores(g, a, depth - 1))
        }
        _ => false,
    }
}

/// GQA's repeat_kv, `Reshape(Expand(Unsqueeze(x, [2]), [b, hkv, n, t, d]), [b, hkv*n, t, d])`:
/// returns x. Anything else is returned unchanged.
fn unrepeat(g: &Graph, r: ValueRef) -> ValueRef {
    let find = || -> Option<ValueRef> {
        let rv = skip_identity(g, r, false)?;
        let Op::Reshape { .. } = op(g, rv) else { return None };
        let e = skip_identity(g, arg(g, rv, 0)?, false)?;
        let Op::Expand = op(g, e) else { return None };
        let u = skip_identity(g, arg(g, e, 0)?, false)?;
        let Op::Unsqueeze = op(g, u) else { return None };
        let axes = g.const_of(arg(g, u, 1)?)?.to_tensor().to_i64_vec().ok()?;
        let x = arg(g, u, 0)?;
        let (xs, es, rs) = (rank4(g, x)?, shape(g, e)?, rank4(g, rv)?);
        let n = es.get(2)?.as_fixed()?;
        let ok = (axes == [2] || axes == [-3])
            && es.len() == 5
            && es[0] == xs[0]
            && es[1] == xs[1]
            && es[3] == xs[2]
            && es[4] == xs[3]
            && rs[0] == xs[0]
            && rs[1] == xs[1].checked_mul(&Dim::fixed(n))?
            && rs[2] == xs[2]
            && rs[3] == xs[3];
        ok.then_some(x)
    };
    find().unwrap_or(r)
}

fn find(g: &Graph, out: ValueRef) -> Option<Found> {
    let os = rank4(g, out)?;
    if g.ty(out).dtype != DType::F32 {
        return None;
    }
    let p = skip_identity(g, arg(g, out, 0)?, true)?;
    let v_rep = arg(g, out, 1)?;
    if !single_use(g, p) || !matches!(op(g, p), Op::Softmax { axis: -1 | 3 }) {
        return None;
    }
    // Scores chain, from the Softmax input down to q @ k^T.
    let mut cur = skip_identity(g, arg(g, p, 0)?, true)?;
    let mut scale = 1.0;
    let mut masks = Vec::new();
    let mut scaled_above = false;
    let qk = loop {
        if !single_use(g, cur) {
            return None;
        }
        let next = match op(g, cur) {
            Op::MatMul => break cur,
            Op::Binary(BinaryOp::Mul | BinaryOp::Div) => {
                let (x, c) = scaled(g, cur)?;
                scale *= c;
                scaled_above = true;
                x
            }
            Op::Binary(BinaryOp::Add) => {
                let (s, m) = both_orders(g, cur)?.into_iter().find(|&(s, _)| reaches_scores(g, s, 8))?;
                if scaled_above {
                    return None;
                }
                masks.push(MaskTerm::Add(m));
                s
            }
            Op::Where => {
                let (cond, a, b) = (arg(g, cur, 0)?, arg(g, cur, 1)?, arg(g, cur, 2)?);
                let very_negative = |c: ValueRef| scalar(g, c).is_some_and(|c| c <= VERY_NEGATIVE);
                if scaled_above {
                    return None;
                }
                if very_negative(b) && reaches_scores(g, a, 8) {
                    masks.push(MaskTerm::Where { cond, c: b, scores_if_true: true });
                    a
                } else if very_negative(a) && reaches_scores(g, b, 8) {
                    masks.push(MaskTerm::Where { cond, c: a, scores_if_true: false });
                    b
                } else {
                    return None;
                }
            }
            _ => return None,
        };
        cur = skip_identity(g, next, true)?;
    };
    // q, with a scalar pre-scale folded in.
    let mut q = arg(g, qk, 0)?;
    if let Some((x, c)) = scaled(g, q).filter(|_| single_use(g, q)) {
        q = x;
        scale *= c;
    }
    let kt = skip_identity(g, arg(g, qk, 1)?, false)?;
    let k = match op(g, kt) {
        Op::Transpose { perm } => {
            let p: Vec<i64> = perm.clone().unwrap_or_else(|| vec![3, 2, 1, 0]);
            if p.len() != 4 {
                return None;
            }
            let pk = vec![p[0], p[1], p[3], p[2]];
            let mut x = arg(g, kt, 0)?;
            if pk == [0, 1, 2, 3] {
                if let Some((y, c)) = scaled(g, x).filter(|_| single_use(g, x)) {
                    x = y;
                    scale *= c;
                }
                KSource::Value(unrepeat(g, x))
            } else {
                KSource::Transpose(x, pk)
            }
        }
        _ => KSource::Transpose(kt, vec![0, 1, 3, 2]),
    };
    let v = unrepeat(g, v_rep);
    // Shapes: q [b, hq, s, d], k [b, hkv, t, d], v [b, hkv, t, dv].
    let qs = rank4(g, q)?;
    let ks: Vec<Dim> = match &k {
        KSource::Value(k) => rank4(g, *k)?.to_vec(),
        KSource::Transpose(x, p) => {
            let xs = rank4(g, *x)?;
            p.iter().map(|&a| xs.get(a as usize).cloned()).collect::<Option<_>>()?
        }
    };
    let vs = rank4(g, v)?;
    let (hq, hkv) = (qs[1].as_fixed()?, ks[1].as_fixed()?);
    let fits = qs[0] == ks[0]
        && ks[0] == vs[0]
        && qs[3] == ks[3]
        && ks[1] == vs[1]
        && ks[2] == vs[2]
        && hkv > 0
        && hq % hkv == 0
        && os == [qs[0].clone(), qs[1].clone(), qs[2].clone(), vs[3].clone()];
    let f32s = [q, v].iter().all(|&x| g.ty(x).dtype == DType::F32);
    if !fits || !f32s {
        return None;
    }
    // Masks must broadcast to [b, hq, s, t] (symbols of different names may be equal at run time).
    let full = [qs[0].clone(), qs[1].clone(), qs[2].clone(), ks[2].clone()];
    for m in &masks {
        let mv = match m {
            MaskTerm::Add(m) => *m,
            MaskTerm::Where { cond, .. } => *cond,
        };
        let ms = shape(g, mv)?;
        let dt_ok = matches!(m, MaskTerm::Where { .. }) || g.ty(mv).dtype == DType::F32;
        let dims_ok = ms.len() <= 4
            && ms
                .iter()
                .rev()
                .zip(full.iter().rev())
                .all(|(a, f)| a == f || *a == Dim::fixed(1) || !a.is_fixed() || !f.is_fixed());
        if !dt_ok || !dims_ok {
            return None;
        }
    }
    Some(Found { out, q, k, v, scale, masks })
}

/// Numpy broadcast of two known shapes (the first non-1 dim wins).
fn broadcast(a: &[Dim], b: &[Dim]) -> Vec<Dim> {
    let r = a.len().max(b.len());
    (0..r)
        .map(|i| {
            let da = (i + a.len()).checked_sub(r).map(|j| a[j].clone()).unwrap_or(Dim::fixed(1));
            let db = (i + b.len()).checked_sub(r).map(|j| b[j].clone()).unwrap_or(Dim::fixed(1));
            if da == Dim::fixed(1) {
                db
            } else {
                da
            }
        })
        .collect()
}

fn f32_value(name: String, shape: Vec<Dim>) -> Vec<Value> {
    vec![Value { name, ty: TensorType::new(DType::F32, shape) }]
}

/// Mask values already built, so layers sharing a mask share one buffer:
/// keyed by (cond, constant bits, scores_if_true) for Where terms and (a, b) for sums.
#[derive(Default)]
struct MaskCache {
    wheres: HashMap<(ValueRef, u64, bool), ValueRef>,
    sums: HashMap<(ValueRef, ValueRef), ValueRef>,
}

/// Rewrites one match: the additive mask from its terms, k in [b, hkv, t, d], the fused op.
fn rewrite(g: &mut Graph, f: Found, cache: &mut MaskCache) -> ValueRef {
    let base = g.g[f.out.node].name.clone();
    let mut mask: Option<ValueRef> = None;
    for (i, m) in f.masks.iter().enumerate() {
        let term = match *m {
            MaskTerm::Add(v) => v,
            MaskTerm::Where { cond, c, scores_if_true } => {
                let cv = scalar(g, c).expect("checked") as f32;
                let key = (cond, cv.to_bits() as u64, scores_if_true);
                match cache.wheres.get(&key) {
                    Some(&v) => v,
                    None => {
                        let zero = g.add_const(format!("{base}/mask_zero"), &Tensor::scalar(0.0f32));
                        let c32 = g.add_const(format!("{base}/mask_min"), &Tensor::scalar(cv));
                        let cs = shape(g, cond).expect("checked").to_vec();
                        let (t, e) = if scores_if_true { (zero, c32) } else { (c32, zero) };
                        let n = g.add_node(
                            Op::Where,
                            format!("{base}/mask{i}"),
                            &[Some(cond), Some(t), Some(e)],
                            f32_value(format!("{base}/mask{i}"), cs),
                        );
                        let v = ValueRef { node: n, slot: 0 };
                        cache.wheres.insert(key, v);
                        v
                    }
                }
            }
        };
        mask = Some(match mask {
            None => term,
            Some(acc) => match cache.sums.get(&(acc, term)) {
                Some(&v) => v,
                None => {
                    let s = broadcast(shape(g, acc).expect("checked"), shape(g, term).expect("checked"));
                    let n = g.add_node(
                        Op::Binary(BinaryOp::Add),
                        format!("{base}/mask_sum{i}"),
                        &[Some(acc), Some(term)],
                        f32_value(format!("{base}/mask_sum{i}"), s),
                    );
                    let v = ValueRef { node: n, slot: 0 };
                    cache.sums.insert((acc, term), v);
                    v
                }
            },
        });
    }
    let k = match f.k {
        KSource::Value(k) => k,
        KSource::Transpose(x, perm) => {
            let xs = shape(g, x).expect("checked").to_vec();
            let ks = perm.iter().map(|&a| xs[a as usize].clone()).collect();
            let n = g.add_node(
                Op::Transpose { perm: Some(perm) },
                format!("{base}/k"),
                &[Some(x)],
                f32_value(format!("{base}/k"), ks),
            );
            ValueRef { node: n, slot: 0 }
        }
    };
    let out = g.value(f.out).clone();
    let n = g.add_node(
        Op::Attention { scale: f.scale as f32 },
        base,
        &[Some(f.q), Some(k), Some(f.v), mask],
        vec![Value { name: out.name, ty: out.ty }],
    );
    ValueRef { node: n, slot: 0 }
}

impl Pass for FuseAttention {
    fn name(&self) -> &'static str {
        "fuse-attention"
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats> {
        let mut cache = MaskCache::default();
        fuse_nodes(g, false, |g, n| {
            if g.g[n].op != Op::MatMul {
                return Ok(false);
            }
            let out = ValueRef { node: n, slot: 0 };
            let Some(f) = find(g, out) else { return Ok(false) };
            let fused = rewrite(g, f, &mut cache);
            g.replace_uses(out, fused);
            Ok(true)
        })
    }
}

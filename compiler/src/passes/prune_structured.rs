//! Structured pruning: removes attention heads and MLP intermediate channels and shrinks the dense
//! matrices, so the model is smaller and faster with the ordinary dense kernels.
//!
//! Blocks are found by dataflow, not by names:
//! - attention: three linear layers reading one value (q, k, v) whose results reach exactly one
//!   other linear layer (o) through two activation×activation MatMuls (scores, probs·v); q is the
//!   left operand of the scores MatMul. Head counts come from the Reshape that splits q / k.
//! - MLP: linear layers reading one value (gate, up) whose results reach exactly one other linear
//!   layer (down) through elementwise ops only (SiLU, GELU, products).
//!
//! Importance of a head / channel is the energy its term adds to the block's output on the
//! calibration rows, `‖X_h·W_h‖² = tr(W_hᵀ H_hh W_h)` with `H` the Gram matrix of the o / down input
//! and `W_h` the head's rows of o (a channel: `H_cc·‖W_d[c,:]‖²`), i.e. the output error of removing
//! it alone. Heads go per KV group: GQA removes the same number of query heads from every group
//! (the KV cache keeps its shape); plain multi-head attention removes whole heads (and their KV).
//! Each block loses the fraction F of its attention + MLP parameters: the head count is rounded, the
//! MLP takes the rest (channel counts kept at multiples of 8 for the vector kernels).
//!
//! Removing a head / channel removes columns of q/k/v (gate/up) and rows of o (down). Only o and
//! down see a changed input, so recovery re-fits them: `W'_S = (H_SS + λI)⁻¹ H_S: W`. The shape
//! constants that encode head counts (e.g. repeat_kv's Expand `[b, kv, rep, s, hd]` and Reshape
//! `[b, q, s, hd]`) are rewritten per use, and KV-cache graph inputs get their new head count.

use super::prune::{
    replace_weight, run_layers, weight_kn, weight_tensor, GramCache, LayerReport, PruneReport, PruneSpec, Recover,
};
use crate::calib::{self, linalg, Calibration, Gram, Linear};
use crate::error::{Error, Result};
use crate::ir::{DType, Dim, Graph, Op, Tensor, ValueRef};
use petgraph::stable_graph::NodeIndex;
use petgraph::Direction;
use std::collections::{BTreeSet, HashMap, HashSet};

/// One attention block.
#[derive(Clone, Debug)]
pub struct Attention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub nq: usize,
    pub nkv: usize,
    pub hd: usize,
    /// Nodes between q/k/v and o (where head-count shape constants live).
    region: Vec<NodeIndex>,
}

/// One MLP block.
#[derive(Clone, Debug)]
pub struct Mlp {
    pub ups: Vec<Linear>,
    pub down: Linear,
    pub f: usize,
}

/// Nodes reachable from `start` without passing through a linear layer; the linear layers met.
fn closure(g: &Graph, start: NodeIndex, linears: &HashSet<NodeIndex>) -> (Vec<NodeIndex>, BTreeSet<NodeIndex>) {
    let mut seen = HashSet::new();
    let mut nodes = Vec::new();
    let mut hit = BTreeSet::new();
    let mut stack: Vec<NodeIndex> = g.g.neighbors_directed(start, Direction::Outgoing).collect();
    while let Some(n) = stack.pop() {
        if !seen.insert(n) {
            continue;
        }
        if linears.contains(&n) {
            hit.insert(n);
            continue;
        }
        nodes.push(n);
        stack.extend(g.g.neighbors_directed(n, Direction::Outgoing));
        if nodes.len() > 10_000 {
            break;
        }
    }
    (nodes, hit)
}

fn is_act_matmul(g: &Graph, n: NodeIndex) -> bool {
    matches!(g.g[n].op, Op::MatMul) && g.inputs_of(n).iter().flatten().all(|v| g.const_of(*v).is_none())
}

/// The first (rank-raising) Reshape after a projection: its output's last two dims are (heads, hd).
fn head_split(g: &Graph, l: &Linear) -> Option<(usize, usize)> {
    let mut v = ValueRef { node: l.node, slot: 0 };
    for _ in 0..4 {
        let users = g.users_of(v);
        let &(u, _) = users.first()?;
        if let Op::Reshape { .. } = g.g[u].op {
            let dims = g.ty(ValueRef { node: u, slot: 0 }).shape.clone()?;
            let r = dims.len();
            let (h, d) = (dims.get(r.checked_sub(2)?)?.as_fixed()?, dims[r - 1].as_fixed()?);
            return (h as usize * d as usize == l.n).then_some((h as usize, d as usize));
        }
        if users.len() != 1 {
            return None;
        }
        v = ValueRef { node: u, slot: 0 };
    }
    None
}

/// Finds the attention and MLP blocks among the prunable linear layers.
pub fn find_blocks(g: &Graph, layers: &[Linear]) -> (Vec<Attention>, Vec<Mlp>) {
    let set: HashSet<NodeIndex> = layers.iter().map(|l| l.node).collect();
    let by_node: HashMap<NodeIndex, &Linear> = layers.iter().map(|l| (l.node, l)).collect();
    let mut groups: Vec<(ValueRef, Vec<&Linear>)> = Vec::new();
    for l in layers {
        match groups.iter_mut().find(|(v, _)| *v == l.input) {
            Some((_, ls)) => ls.push(l),
            None => groups.push((l.input, vec![l])),
        }
    }
    let (mut attn, mut mlp) = (Vec::new(), Vec::new());
    for (_, ls) in groups {
        // Each member's single downstream linear layer, and what lies between.
        let mut by_target: HashMap<NodeIndex, Vec<(&Linear, Vec<NodeIndex>)>> = HashMap::new();
        for l in &ls {
            let (nodes, hit) = closure(g, l.node, &set);
            if hit.len() == 1 {
                by_target.entry(*hit.iter().next().unwrap()).or_default().push((l, nodes));
            }
        }
        for (target, members) in by_target {
            let Some(&down) = by_node.get(&target) else { continue };
            let region: BTreeSet<NodeIndex> = members.iter().flat_map(|(_, n)| n.iter().copied()).collect();
            if members.len() == 3 && region.iter().filter(|&&n| is_act_matmul(g, n)).count() == 2 {
                if let Some(a) = attention(g, &members, down, region) {
                    attn.push(a);
                }
            } else if let Some(m) = mlp_block(g, &members, down, &region) {
                mlp.push(m);
            }
        }
    }
    attn.sort_by_key(|a| a.o.node);
    mlp.sort_by_key(|m| m.down.node);
    (attn, mlp)
}

fn attention(
    g: &Graph,
    members: &[(&Linear, Vec<NodeIndex>)],
    o: &Linear,
    region: BTreeSet<NodeIndex>,
) -> Option<Attention> {
    // The first activation MatMul each projection reaches, and in which operand.
    let first_mm = |l: &Linear| -> Option<(NodeIndex, usize)> {
        let mut frontier = vec![ValueRef { node: l.node, slot: 0 }];
        let mut seen = HashSet::new();
        let mut best: Option<(NodeIndex, usize)> = None;
        while let Some(v) = frontier.pop() {
            for (u, slot) in g.users_of(v) {
                if !seen.insert(u) || !region.contains(&u) {
                    continue;
                }
                if is_act_matmul(g, u) {
                    if best.is_none_or(|b| u < b.0) {
                        best = Some((u, slot));
                    }
                    continue;
                }
                frontier.extend((0..g.g[u].outputs.len()).map(|s| ValueRef { node: u, slot: s }));
            }
        }
        best
    };
    let firsts: Vec<(NodeIndex, usize)> = members.iter().map(|(l, _)| first_mm(l)).collect::<Option<_>>()?;
    let qi = (0..3).find(|&i| firsts[i].1 == 0)?;
    let ki = (0..3).find(|&i| i != qi && firsts[i].0 == firsts[qi].0)?;
    let vi = 3 - qi - ki;
    let (q, k, v) = (members[qi].0.clone(), members[ki].0.clone(), members[vi].0.clone());
    let (nq, hd) = head_split(g, &q)?;
    let (nkv, hd2) = head_split(g, &k)?;
    if hd != hd2 || nkv == 0 || nq % nkv != 0 || v.n != nkv * hd || o.k != nq * hd {
        return None;
    }
    Some(Attention { q, k, v, o: o.clone(), nq, nkv, hd, region: region.into_iter().collect() })
}

fn mlp_block(
    g: &Graph,
    members: &[(&Linear, Vec<NodeIndex>)],
    down: &Linear,
    region: &BTreeSet<NodeIndex>,
) -> Option<Mlp> {
    let f = down.k;
    if members.iter().any(|(l, _)| l.n != f) {
        return None;
    }
    let inside = |v: &ValueRef| members.iter().any(|(l, _)| l.node == v.node) || region.contains(&v.node);
    for &n in region {
        let elementwise =
            matches!(g.g[n].op, Op::Unary(_) | Op::Binary(_) | Op::Cast { .. } | Op::Identity | Op::Variadic(_));
        if !elementwise {
            return None;
        }
        // Other operands must be scalars: a per-channel operand would need slicing too.
        for v in g.inputs_of(n).into_iter().flatten() {
            if !inside(&v) && g.ty(v).fixed_shape().is_none_or(|s| s.iter().product::<usize>() != 1) {
                return None;
            }
        }
        // Nothing in the block may be read from outside it.
        let out = ValueRef { node: n, slot: 0 };
        if g.outputs.iter().any(|o| o.value == out)
            || g.users_of(out).iter().any(|(u, _)| !region.contains(u) && *u != down.node)
        {
            return None;
        }
    }
    for (l, _) in members {
        let out = ValueRef { node: l.node, slot: 0 };
        if g.users_of(out).iter().any(|(u, _)| !region.contains(u) && *u != down.node) {
            return None;
        }
    }
    Some(Mlp { ups: members.iter().map(|(l, _)| (*l).clone()).collect(), down: down.clone(), f })
}

/// What to keep of one attention block: query heads (sorted) and KV groups (sorted).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeadChoice {
    pub q_heads: Vec<usize>,
    pub kv_groups: Vec<usize>,
}

/// Per-block removal counts from the fraction (see the module comment).
struct Budget {
    /// Query heads to remove per KV group (GQA), or whole groups (MHA).
    attn_remove: Vec<usize>,
    mlp_keep: Vec<usize>,
}

fn budget(attn: &[Attention], mlp: &[Mlp], f: f64) -> Budget {
    let attn_params = |a: &Attention| [&a.q, &a.k, &a.v, &a.o].iter().map(|l| l.k * l.n).sum::<usize>();
    let mlp_params = |m: &Mlp| m.ups.iter().map(|l| l.k * l.n).sum::<usize>() + m.down.k * m.down.n;
    let total: usize = attn.iter().map(attn_params).sum::<usize>() + mlp.iter().map(mlp_params).sum::<usize>();
    let mut removed = 0usize;
    let attn_remove: Vec<usize> = attn
        .iter()
        .map(|a| {
            let rep = a.nq / a.nkv;
            let head = a.hd * (a.q.k + a.o.n);
            if rep > 1 {
                let r = ((f * rep as f64).round() as usize).min(rep - 1);
                removed += r * a.nkv * head;
                r
            } else {
                let r = ((f * a.nkv as f64).round() as usize).min(a.nkv - 1);
                removed += r * (head + a.hd * (a.k.k + a.v.k));
                r
            }
        })
        .collect();
    let left = (f * total as f64 - removed as f64).max(0.0);
    let mlp_total: usize = mlp.iter().map(mlp_params).sum();
    let mlp_keep = mlp
        .iter()
        .map(|m| {
            let per_channel = m.ups.iter().map(|l| l.k).sum::<usize>() + m.down.n;
            let share = left * mlp_params(m) as f64 / mlp_total.max(1) as f64;
            let remove = (share / per_channel as f64).round() as usize;
            let keep = m.f.saturating_sub(remove).max(1);
            // Multiples of 8 suit the f32x4 / 16-column kernels; never round up past F.
            if m.f >= 16 {
                ((keep + 4) / 8 * 8).clamp(8, m.f)
            } else {
                keep
            }
        })
        .collect();
    Budget { attn_remove, mlp_keep }
}

/// Energy each input row block adds to the output: `tr(W_Bᵀ H_BB W_B)` for row blocks of `size`.
fn block_energy(h: &Gram, w: &[f64], n: usize, size: usize) -> Vec<f64> {
    let k = h.k;
    (0..k / size)
        .map(|b| {
            let rows = b * size..(b + 1) * size;
            let mut e = 0.0;
            for i in rows.clone() {
                for j in rows.clone() {
                    let c = h.h[i * k + j];
                    if c != 0.0 {
                        e += c * linalg::dot(&w[i * n..i * n + n], &w[j * n..j * n + n]);
                    }
                }
            }
            e
        })
        .collect()
}

fn choose_heads(a: &Attention, remove: usize, energy: &[f64]) -> HeadChoice {
    let rep = a.nq / a.nkv;
    let by_energy = |mut v: Vec<usize>, e: &dyn Fn(usize) -> f64, keep: usize| {
        v.sort_by(|&x, &y| e(y).total_cmp(&e(x)).then(x.cmp(&y)));
        v.truncate(keep);
        v.sort();
        v
    };
    if rep > 1 {
        let q_heads = (0..a.nkv)
            .flat_map(|grp| by_energy((grp * rep..(grp + 1) * rep).collect(), &|h| energy[h], rep - remove))
            .collect();
        HeadChoice { q_heads, kv_groups: (0..a.nkv).collect() }
    } else {
        let kv_groups = by_energy((0..a.nkv).collect(), &|h| energy[h], a.nkv - remove);
        HeadChoice { q_heads: kv_groups.clone(), kv_groups }
    }
}

/// Rows of `w` (`[K, N]`) for input channels `keep`; re-fitted to the full layer's output on `h`
/// when `damp` is given: `(H_SS + λI)⁻¹ H_S: W`.
/// `target` (`[K, N]`) replaces `H·W` on the right-hand side: corrective recovery fits `X_pᵀX_o·W`.
fn refit_rows(
    w: &[f64],
    n: usize,
    keep: &[usize],
    h: &Gram,
    damp: Option<f64>,
    target: Option<&[f64]>,
) -> Result<Vec<f64>, String> {
    let kept: Vec<f64> = keep.iter().flat_map(|&r| w[r * n..r * n + n].iter().copied()).collect();
    let Some(damp) = damp else { return Ok(kept) };
    let (k, s) = (h.k, keep.len());
    let mut hss = vec![0f64; s * s];
    for (a, &i) in keep.iter().enumerate() {
        for (b, &j) in keep.iter().enumerate() {
            hss[a * s + b] = h.h[i * k + j];
        }
    }
    let mut l = linalg::damped(&hss, s, damp);
    linalg::cholesky(&mut l, s)?;
    // B = H_S: W  (s × n).
    let mut b = vec![0f64; s * n];
    if let Some(t) = target {
        for (a, &i) in keep.iter().enumerate() {
            b[a * n..a * n + n].copy_from_slice(&t[i * n..i * n + n]);
        }
        linalg::cholesky_solve(&l, s, &mut b, n);
        return Ok(b);
    }
    for (a, &i) in keep.iter().enumerate() {
        let brow = &mut b[a * n..a * n + n];
        for j in 0..k {
            let c = h.h[i * k + j];
            if c != 0.0 {
                for (x, &y) in brow.iter_mut().zip(&w[j * n..j * n + n]) {
                    *x += c * y;
                }
            }
        }
    }
    linalg::cholesky_solve(&l, s, &mut b, n);
    Ok(b)
}

/// The full-height matrix with only `keep` rows nonzero (what the shrunk layer computes).
fn expand_rows(kept: &[f64], n: usize, keep: &[usize], k: usize) -> Vec<f64> {
    let mut w = vec![0f64; k * n];
    for (a, &r) in keep.iter().enumerate() {
        w[r * n..r * n + n].copy_from_slice(&kept[a * n..a * n + n]);
    }
    w
}

/// Decision and new rows of one pruned o / down layer.
struct Decided {
    keep_rows: Vec<usize>,
    rows: Vec<f64>,
    heads: Option<HeadChoice>,
    rel_error: f64,
}

enum Unit<'a> {
    Attn(&'a Attention, usize),
    Mlp(&'a Mlp, usize),
}

impl Unit<'_> {
    /// The layer whose input rows the unit removes (o or down).
    fn layer(&self) -> &Linear {
        match self {
            Unit::Attn(a, _) => &a.o,
            Unit::Mlp(m, _) => &m.down,
        }
    }
}

fn decide(g: &Graph, unit: &Unit, h: &Gram, spec: &PruneSpec, target: Option<&[f64]>) -> Result<Decided, String> {
    let (l, keep_rows, heads) = match *unit {
        Unit::Attn(a, remove) => {
            let w = weight_kn(g, &a.o);
            let energy = block_energy(h, &w, a.o.n, a.hd);
            let choice = choose_heads(a, remove, &energy);
            let rows = choice.q_heads.iter().flat_map(|&hh| hh * a.hd..(hh + 1) * a.hd).collect();
            (&a.o, rows, Some(choice))
        }
        Unit::Mlp(m, keep) => {
            let w = weight_kn(g, &m.down);
            let energy = block_energy(h, &w, m.down.n, 1);
            let mut idx: Vec<usize> = (0..m.f).collect();
            idx.sort_by(|&x, &y| energy[y].total_cmp(&energy[x]).then(x.cmp(&y)));
            idx.truncate(keep);
            idx.sort();
            (&m.down, idx, None)
        }
    };
    let w = weight_kn(g, l);
    let damp = (spec.recover != Recover::None).then_some(spec.damp);
    let rows = refit_rows(&w, l.n, &keep_rows, h, damp, target)?;
    let rel_error = super::prune::rel_error(h, &w, &expand_rows(&rows, l.n, &keep_rows, l.k), l.n);
    Ok(Decided { keep_rows, rows, heads, rel_error })
}

/// Structured pruning of `g` by fraction `f` (see the module comment).
pub fn prune(g: &mut Graph, f: f64, spec: &PruneSpec, seqs: &[Vec<u32>], report: &mut PruneReport) -> Result<()> {
    let layers = super::prune::prunable_layers(g);
    let (attn, mlp) = find_blocks(g, &layers);
    if attn.is_empty() && mlp.is_empty() {
        return Err(Error::invalid(
            "structured pruning found no attention (q/k/v -> o) or MLP (up -> elementwise -> down) blocks",
        ));
    }
    let b = budget(&attn, &mlp, f);
    let mut units: HashMap<NodeIndex, Unit> = HashMap::new();
    for (a, &r) in attn.iter().zip(&b.attn_remove) {
        units.insert(a.o.node, Unit::Attn(a, r));
    }
    for (m, &keep) in mlp.iter().zip(&b.mlp_keep) {
        units.insert(m.down.node, Unit::Mlp(m, keep));
    }
    let mut decided: HashMap<NodeIndex, Decided> = HashMap::new();
    {
        let gref: &Graph = g;
        if spec.recover == Recover::OneShot {
            let cal = Calibration::collect(gref, seqs, &calib::Options { channel_stats: false, ..Default::default() })?;
            for (&n, unit) in &units {
                let h = cal.gram_for(gref, n).ok_or_else(|| Error::invalid("a pruned layer did not run"))?;
                decided.insert(n, decide(gref, unit, h, spec, None).map_err(Error::invalid)?);
            }
        } else {
            // Sequential: each o / down is decided on the pruned model's activations and swapped in.
            let targets: Vec<Linear> = units.values().map(|u| u.layer().clone()).collect();
            let mut grams = GramCache::new(&targets);
            run_layers(gref, seqs, spec.recover == Recover::Corrective, &mut |n, x, x_orig| {
                let Some(unit) = units.get(&n) else { return Ok(None) };
                let l = unit.layer();
                let h = grams.get(l, x);
                let target = x_orig.map(|xo| grams.cross_times(l, x, xo, &weight_kn(gref, l)));
                let d = decide(gref, unit, &h, spec, target.as_deref())?;
                grams.done(l);
                let t = weight_tensor(l, &expand_rows(&d.rows, l.n, &d.keep_rows, l.k));
                decided.insert(n, d);
                Ok(Some(t))
            })?;
        }
    }
    // Shrink.
    for a in &attn {
        let d = decided.remove(&a.o.node).ok_or_else(|| Error::invalid("an attention block did not run"))?;
        let choice = d.heads.clone().expect("attention decisions carry heads");
        shrink_attention(g, a, &choice, &d, report)?;
    }
    for m in &mlp {
        let d = decided.remove(&m.down.node).ok_or_else(|| Error::invalid("an MLP block did not run"))?;
        let cols = &d.keep_rows;
        for up in &m.ups {
            shrink_cols(g, up, cols, None, report);
        }
        shrink_rows(g, &m.down, &d, report);
        report.mlp_channels.push((m.f, cols.len()));
        report.kept_channels.push(cols.clone());
    }
    Ok(())
}

fn name_of(g: &Graph, l: &Linear) -> String {
    g.const_of(l.weight).map_or_else(String::new, |c| c.name.clone())
}

/// Keeps output columns `cols` of a layer.
fn shrink_cols(g: &mut Graph, l: &Linear, cols: &[usize], rel_error: Option<f64>, report: &mut PruneReport) {
    let w = weight_kn(g, l);
    let kept: Vec<f64> =
        (0..l.k).flat_map(|r| cols.iter().map(move |&c| (r, c))).map(|(r, c)| w[r * l.n + c]).collect();
    let nl = Linear { n: cols.len(), ..l.clone() };
    let t = weight_tensor(&nl, &kept);
    push_layer(g, l, &t, rel_error, report);
    replace_weight(g, l, &t);
}

/// Keeps (re-fitted) input rows of a layer.
fn shrink_rows(g: &mut Graph, l: &Linear, d: &Decided, report: &mut PruneReport) {
    let nl = Linear { k: d.keep_rows.len(), ..l.clone() };
    let t = weight_tensor(&nl, &d.rows);
    push_layer(g, l, &t, Some(d.rel_error), report);
    replace_weight(g, l, &t);
}

fn push_layer(g: &Graph, l: &Linear, t: &Tensor, rel_error: Option<f64>, report: &mut PruneReport) {
    let before = g.const_of(l.weight).map_or_else(Vec::new, |c| c.shape.clone());
    let nz = t.to_f64_vec().iter().filter(|&&x| x != 0.0).count();
    report.layers.push(LayerReport {
        name: name_of(g, l),
        shape_before: before,
        shape_after: t.shape.clone(),
        nonzeros: nz,
        sparsity: 1.0 - nz as f64 / t.len().max(1) as f64,
        rel_error,
    });
}

fn shrink_attention(g: &mut Graph, a: &Attention, c: &HeadChoice, d: &Decided, report: &mut PruneReport) -> Result<()> {
    let hd = a.hd;
    let cols = |heads: &[usize]| -> Vec<usize> { heads.iter().flat_map(|&h| h * hd..(h + 1) * hd).collect() };
    let (nq2, nkv2) = (c.q_heads.len(), c.kv_groups.len());
    let (rep, rep2) = (a.nq / a.nkv, nq2 / nkv2);
    shrink_cols(g, &a.q, &cols(&c.q_heads), None, report);
    shrink_cols(g, &a.k, &cols(&c.kv_groups), None, report);
    shrink_cols(g, &a.v, &cols(&c.kv_groups), None, report);
    shrink_rows(g, &a.o, d, report);
    report.heads.push(((a.nq, a.nkv), (nq2, nkv2)));
    report.kept_heads.push(c.q_heads.clone());
    // Shape constants inside the block.
    let map_value = |v: i64| -> i64 {
        match v as usize {
            x if x == a.nq * hd => (nq2 * hd) as i64,
            x if x == a.nkv * hd => (nkv2 * hd) as i64,
            x if x == a.nq => nq2 as i64,
            x if x == a.nkv => nkv2 as i64,
            _ => v,
        }
    };
    for &n in &a.region {
        if !g.g.contains_node(n) {
            continue;
        }
        let is_expand = matches!(g.g[n].op, Op::Expand);
        if !is_expand && !matches!(g.g[n].op, Op::Reshape { .. }) {
            continue;
        }
        let ins = g.inputs_of(n);
        let in_dims: Vec<Option<i64>> = ins[0]
            .and_then(|v| g.ty(v).shape.clone())
            .map(|s| s.iter().map(Dim::as_fixed).collect())
            .unwrap_or_default();
        let out_rank = g.ty(ValueRef { node: n, slot: 0 }).rank().unwrap_or(0);
        rewrite_shape(g, n, 1, &|axis, v| {
            if v <= 0 {
                return v; // -1 (infer) and 0 (copy) follow the data
            }
            if is_expand {
                // Right-aligned broadcast: a size-1 input axis expanded to `rep` is repeat_kv's.
                let off = out_rank as isize - in_dims.len() as isize;
                let ind = (axis as isize - off).try_into().ok().and_then(|i: usize| in_dims.get(i).copied().flatten());
                if ind == Some(1) {
                    return if v as usize == rep && rep > 1 { rep2 as i64 } else { v };
                }
            }
            map_value(v)
        })?;
    }
    // KV-cache inputs concatenated with k / v carry the KV head count.
    if nkv2 != a.nkv {
        for &n in &a.region {
            if !g.g.contains_node(n) || !matches!(g.g[n].op, Op::Concat { .. }) {
                continue;
            }
            for v in g.inputs_of(n).into_iter().flatten() {
                if let Op::Input { .. } = g.g[v.node].op {
                    let ty = &mut g.g[v.node].outputs[0].ty;
                    if let Some(dims) = ty.shape.as_mut() {
                        let last = dims.len().saturating_sub(1);
                        if let Some(d) = dims.iter_mut().take(last).find(|d| d.as_fixed() == Some(a.nkv as i64)) {
                            *d = Dim::fixed(nkv2 as i64);
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// Rewrites the shape operand (input `slot` of `node`, a constant or a Concat of 1-D pieces) entry by
/// entry with `f(axis, value)`. Changed pieces become new constants wired to this node only: exporters
/// and CSE share shape constants between unrelated uses (the tiny Llama's `[4]` is both a head count
/// and rotate_half's slice end).
fn rewrite_shape(g: &mut Graph, node: NodeIndex, slot: usize, f: &dyn Fn(usize, i64) -> i64) -> Result<()> {
    let Some(Some(v)) = g.inputs_of(node).get(slot).copied() else { return Ok(()) };
    let mapped = |g: &Graph, v: ValueRef, offset: usize| -> Option<Tensor> {
        let c = g.const_of(v)?;
        if !matches!(c.dtype, DType::I64 | DType::I32) || c.shape.len() > 1 {
            return None;
        }
        let vals = c.to_tensor().to_i64_vec().ok()?;
        let new: Vec<i64> = vals.iter().enumerate().map(|(i, &x)| f(offset + i, x)).collect();
        (new != vals).then(|| Tensor::from_vec(c.shape.clone(), new).cast(c.dtype))
    };
    if let Some(t) = mapped(g, v, 0) {
        let name = g.const_of(v).map_or_else(String::new, |c| c.name.clone());
        let c = g.add_const(name, &t);
        g.set_input(node, slot, c);
        return Ok(());
    }
    if !matches!(g.g[v.node].op, Op::Concat { axis: 0 } | Op::Concat { axis: -1 }) {
        return Ok(());
    }
    let pieces = g.inputs_of(v.node);
    let mut offset = 0;
    let mut new_pieces = pieces.clone();
    let mut changed = false;
    for (i, p) in pieces.iter().enumerate() {
        let Some(p) = p else { return Ok(()) };
        let len = g.ty(*p).fixed_shape().and_then(|s| s.first().copied()).unwrap_or(1);
        if let Some(t) = mapped(g, *p, offset) {
            let name = g.const_of(*p).map_or_else(String::new, |c| c.name.clone());
            new_pieces[i] = Some(g.add_const(name, &t));
            changed = true;
        }
        offset += len;
    }
    if changed {
        let node_v = g.g[v.node].clone();
        let nc = g.add_node(node_v.op, format!("{}_pruned", node_v.name), &new_pieces, node_v.outputs);
        g.set_input(node, slot, ValueRef { node: nc, slot: 0 });
    }
    Ok(())
}

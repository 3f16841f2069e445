//! Weight pruning of linear layers (constant-weight MatMul / Gemm), with optional layer-wise
//! recovery on calibration data.
//!
//! Kinds (`PruneSpec::parse`, `edgec compile --prune SPEC`):
//! - `unstructured:F` — per weight matrix, zero the fraction F of weights with the smallest |w|;
//! - `N:M` (e.g. `2:4`) — in every group of M consecutive weights along the input (K) dimension keep
//!   the N largest |w|;
//! - `structured:F` — remove attention heads and MLP channels and shrink the dense matrices
//!   (`prune_structured.rs`).
//!
//! Recovery (`:recover` suffix or `--recover`) re-fits the remaining weights of each pruned layer by
//! least squares against the unpruned layer's output on the calibration activations, using only the
//! Gram matrix `H = XᵀX` of the layer's input: minimise `tr((W'−W)ᵀ H (W'−W))` with the sparsity
//! pattern fixed. Structured pruning removes whole input rows, so the optimum is closed-form,
//! `W'_S = (H_SS + λI)⁻¹ H_S: W`; for N:M / unstructured masks every output column has its own
//! support, and the layer is solved OBS-style in one sweep over the input rows (SparseGPT's update
//! with the mask held fixed: the error of each removed weight is spread over the not yet visited
//! weights of its column through the Cholesky factor of `H⁻¹`), which costs `K²·N` instead of a
//! `K×K` solve per column.
//!
//! Recovery is sequential by default: the calibration batch runs through the model once, and each
//! layer is pruned when the interpreter reaches it, from the Gram matrix of its input *in the
//! already pruned model*; the pruned weight is swapped in (`Interpreter::run_hooked`), so later
//! layers fit to the errors of earlier ones. `recover=oneshot` uses the unpruned model's Gram
//! matrices for every layer instead (`calib::Calibration`).
//!
//! The embedding and the output projection (lm_head: a layer whose result is a graph output, or that
//! reads a matrix a Gather also reads) stay dense.

use super::prune_structured as structured;
use crate::calib::{self, linalg, Gram, Linear};
use crate::error::{Error, Result};
use crate::interp::Interpreter;
use crate::ir::{DType, Graph, Op, Tensor, ValueRef};
use petgraph::stable_graph::NodeIndex;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Instant;

#[derive(Clone, Debug, PartialEq)]
pub enum PruneKind {
    /// Fraction of each matrix's weights to zero.
    Unstructured(f64),
    /// Keep `n` of every `m` weights along K.
    NofM { n: usize, m: usize },
    /// Fraction of the attention and MLP parameters of each block to remove.
    Structured(f64),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Recover {
    None,
    /// Every layer from the unpruned model's activations.
    OneShot,
    /// Layer by layer from the pruned model's own activations.
    Sequential,
    /// Sequential, but each layer is fitted to the *original* model's output at that layer (the
    /// calibration batch runs twice side by side, unpruned and pruned), so it also corrects the
    /// error earlier layers left in its input: `min ‖X_p W' − X_o W‖`. Experimental: the dense
    /// re-fit has K unknowns per column and over-fits unless calibration rows far exceed K
    /// (SmolLM2 at 1024 tokens: worse than no recovery for 2:4, worse than `Sequential` structured).
    Corrective,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PruneSpec {
    pub kind: PruneKind,
    pub recover: Recover,
    /// Damping λ relative to the mean of diag(H) (default 0.01 for N:M / unstructured, 0.1 for
    /// structured).
    pub damp: f64,
}

impl PruneSpec {
    /// `unstructured:0.5`, `2:4`, `structured:0.3`, each optionally followed by `:recover`,
    /// `:recover=oneshot` or `:damp=0.01`.
    pub fn parse(s: &str) -> Result<PruneSpec> {
        let bad = |why: &str| {
            Error::invalid(format!(
                "--prune '{s}': {why} (expected unstructured:F, N:M such as 2:4, or structured:F; \
                 optionally followed by :recover, :recover=oneshot|corrective, :damp=X)"
            ))
        };
        let parts: Vec<&str> = s.split(':').map(str::trim).collect();
        let fraction = |p: Option<&&str>| -> Result<f64> {
            let f: f64 = p.ok_or_else(|| bad("missing fraction"))?.parse().map_err(|_| bad("bad fraction"))?;
            if !(0.0..1.0).contains(&f) {
                return Err(bad("the fraction must be in [0, 1)"));
            }
            Ok(f)
        };
        let (kind, rest) = match parts[0] {
            "unstructured" => (PruneKind::Unstructured(fraction(parts.get(1))?), &parts[2..]),
            "structured" => (PruneKind::Structured(fraction(parts.get(1))?), &parts[2..]),
            n if n.parse::<usize>().is_ok() => {
                let n: usize = n.parse().unwrap();
                let m: usize = parts.get(1).and_then(|m| m.parse().ok()).ok_or_else(|| bad("bad N:M"))?;
                if n == 0 || m == 0 || n >= m {
                    return Err(bad("N:M needs 0 < N < M"));
                }
                (PruneKind::NofM { n, m }, &parts[2..])
            }
            _ => return Err(bad("unknown kind")),
        };
        // Measured on SmolLM2 (README): N:M / unstructured recover best with SparseGPT's 1 %;
        // structured re-fits have more unknowns per column than calibration rows and need more.
        let damp = if matches!(kind, PruneKind::Structured(_)) { 0.1 } else { 0.01 };
        let mut spec = PruneSpec { kind, recover: Recover::None, damp };
        for opt in rest {
            match opt.split_once('=') {
                None if *opt == "recover" => spec.recover = Recover::Sequential,
                Some(("recover", "sequential")) => spec.recover = Recover::Sequential,
                Some(("recover", "oneshot")) => spec.recover = Recover::OneShot,
                Some(("recover", "corrective")) => spec.recover = Recover::Corrective,
                Some(("damp", v)) => {
                    spec.damp = v.parse().ok().filter(|d: &f64| *d >= 0.0).ok_or_else(|| bad("bad damp"))?;
                }
                _ => return Err(bad(&format!("unknown option '{opt}'"))),
            }
        }
        Ok(spec)
    }

    /// Whether the pass needs calibration data.
    pub fn needs_calibration(&self) -> bool {
        self.recover != Recover::None || matches!(self.kind, PruneKind::Structured(_))
    }
}

/// One pruned weight matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerReport {
    /// The weight's constant name.
    pub name: String,
    pub shape_before: Vec<usize>,
    pub shape_after: Vec<usize>,
    pub nonzeros: usize,
    /// Zero fraction of the matrix as stored after pruning.
    pub sparsity: f64,
    /// `‖X(W'−W)‖² / ‖XW‖²` on the calibration rows the layer was pruned with (structured: against
    /// the unshrunk matrix), when calibration ran.
    pub rel_error: Option<f64>,
}

/// What pruning did. Bytes count every float constant (the dense storage; `nonzero_bytes_after`
/// counts only nonzero elements, what a sparse format could store).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PruneReport {
    pub spec: String,
    pub layers: Vec<LayerReport>,
    pub param_bytes_before: usize,
    pub param_bytes_after: usize,
    pub nonzero_bytes_after: usize,
    /// Structured: per attention block, (query heads, KV heads) before and after.
    pub heads: Vec<((usize, usize), (usize, usize))>,
    /// Structured: per MLP, channels before and after.
    pub mlp_channels: Vec<(usize, usize)>,
    /// Structured: per attention block (in graph order), the query heads kept (KV group g holds
    /// query heads g·rep .. (g+1)·rep).
    pub kept_heads: Vec<Vec<usize>>,
    /// Structured: per MLP (in graph order), the intermediate channels kept.
    pub kept_channels: Vec<Vec<usize>>,
    pub calib_tokens: usize,
    pub seconds: f64,
}

impl PruneReport {
    /// Human-readable summary (one line per layer, then totals).
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for l in &self.layers {
            s.push_str(&format!(
                "prune       {} {:?} -> {:?}: sparsity {:.3}{}\n",
                l.name,
                l.shape_before,
                l.shape_after,
                l.sparsity,
                l.rel_error.map_or(String::new(), |e| format!(", rel. output error {e:.4}"))
            ));
        }
        for (i, (b, a)) in self.heads.iter().enumerate() {
            s.push_str(&format!("prune       attention {i}: heads {}q/{}kv -> {}q/{}kv\n", b.0, b.1, a.0, a.1));
        }
        for (i, (b, a)) in self.mlp_channels.iter().enumerate() {
            s.push_str(&format!("prune       mlp {i}: channels {b} -> {a}\n"));
        }
        s.push_str(&format!(
            "prune       {}: parameters {} -> {} bytes dense ({} bytes nonzero), {} layers, {} calibration tokens, {:.1} s\n",
            self.spec,
            self.param_bytes_before,
            self.param_bytes_after,
            self.nonzero_bytes_after,
            self.layers.len(),
            self.calib_tokens,
            self.seconds
        ));
        s
    }
}

impl PruneReport {
    /// One JSON object (a row of `edgec compile --report`).
    pub fn to_json(&self) -> String {
        let layers: Vec<String> = self
            .layers
            .iter()
            .map(|l| {
                format!(
                    r#"{{"name":{:?},"shape_before":{:?},"shape_after":{:?},"nonzeros":{},"sparsity":{:.6},"rel_error":{}}}"#,
                    l.name,
                    l.shape_before,
                    l.shape_after,
                    l.nonzeros,
                    l.sparsity,
                    l.rel_error.map_or("null".to_string(), |e| format!("{e:.6}"))
                )
            })
            .collect();
        let heads: Vec<String> =
            self.heads.iter().map(|(b, a)| format!("[[{},{}],[{},{}]]", b.0, b.1, a.0, a.1)).collect();
        let mlp: Vec<String> = self.mlp_channels.iter().map(|(b, a)| format!("[{b},{a}]")).collect();
        format!(
            r#"{{"pass":"prune","spec":{:?},"param_bytes_before":{},"param_bytes_after":{},"nonzero_bytes_after":{},"calib_tokens":{},"ms":{:.1},"heads":[{}],"mlp_channels":[{}],"layers":[{}]}}"#,
            self.spec,
            self.param_bytes_before,
            self.param_bytes_after,
            self.nonzero_bytes_after,
            self.calib_tokens,
            self.seconds * 1e3,
            heads.join(","),
            mlp.join(","),
            layers.join(",")
        )
    }
}

/// Bytes of float constants, dense and nonzero.
fn param_bytes(g: &Graph) -> (usize, usize) {
    let (mut dense, mut nz) = (0, 0);
    for n in g.g.node_indices() {
        if let Some(c) = g.const_of(ValueRef { node: n, slot: 0 }) {
            if c.dtype.is_float() {
                dense += c.bytes.len();
                let t = c.to_tensor();
                nz += t.to_f64_vec().iter().filter(|&&x| x != 0.0).count() * c.dtype.size();
            }
        }
    }
    (dense, nz)
}

/// The linear layers pruning may touch: everything but the output projection / tied embedding.
pub fn prunable_layers(g: &Graph) -> Vec<Linear> {
    calib::linear_layers(g).into_iter().filter(|l| !is_output_projection(g, l)).collect()
}

fn is_output_projection(g: &Graph, l: &Linear) -> bool {
    // A weight shared with a Gather is a tied embedding.
    let shared_with_gather = g.users_of(l.weight).iter().any(|(u, _)| matches!(g.g[*u].op, Op::Gather { .. }));
    // Follow shape-only ops from the result: reaching a graph output makes it the head.
    let mut v = ValueRef { node: l.node, slot: 0 };
    loop {
        if g.outputs.iter().any(|o| o.value == v) {
            return true;
        }
        let users = g.users_of(v);
        match users.as_slice() {
            [(u, 0)]
                if matches!(
                    g.g[*u].op,
                    Op::Reshape { .. } | Op::Identity | Op::Cast { .. } | Op::Squeeze | Op::Unsqueeze
                ) =>
            {
                v = ValueRef { node: *u, slot: 0 };
            }
            _ => return shared_with_gather,
        }
    }
}

/// The weight as an f64 `[K, N]` matrix.
pub fn weight_kn(g: &Graph, l: &Linear) -> Vec<f64> {
    let w = g.const_of(l.weight).expect("a linear layer's weight is a constant").to_tensor().to_f64_vec();
    let mut out = vec![0.0; l.k * l.n];
    for k in 0..l.k {
        for n in 0..l.n {
            out[k * l.n + n] = w[l.index(k, n)];
        }
    }
    out
}

/// A `[K, N]` matrix back in the layer's storage order, as a tensor.
pub fn weight_tensor(l: &Linear, w: &[f64]) -> Tensor {
    let mut out = vec![0f32; l.k * l.n];
    for k in 0..l.k {
        for n in 0..l.n {
            out[l.index(k, n)] = w[k * l.n + n] as f32;
        }
    }
    let shape = if l.transposed { vec![l.n, l.k] } else { vec![l.k, l.n] };
    Tensor::from_vec(shape, out)
}

/// Gives a layer a new weight constant (named after the old one).
pub fn replace_weight(g: &mut Graph, l: &Linear, t: &Tensor) -> ValueRef {
    let name = g.const_of(l.weight).map_or_else(|| "weight".to_string(), |c| c.name.clone());
    let c = g.add_const(name, t);
    g.set_input(l.node, 1, c);
    c
}

/// Keep-mask (true = kept) from magnitudes, `[K, N]`.
fn magnitude_mask(w: &[f64], k: usize, n: usize, kind: &PruneKind) -> Vec<bool> {
    match *kind {
        PruneKind::Unstructured(f) => {
            let drop = ((f * w.len() as f64).round() as usize).min(w.len());
            let mut idx: Vec<usize> = (0..w.len()).collect();
            let mut mask = vec![true; w.len()];
            if drop > 0 {
                // Ties broken by index, so the count is exact.
                idx.select_nth_unstable_by(drop - 1, |&a, &b| w[a].abs().total_cmp(&w[b].abs()).then(a.cmp(&b)));
                for &i in &idx[..drop] {
                    mask[i] = false;
                }
            }
            mask
        }
        PruneKind::NofM { n: keep, m } => {
            let mut mask = vec![false; w.len()];
            for col in 0..n {
                for g0 in (0..k).step_by(m) {
                    let mut rows: Vec<usize> = (g0..(g0 + m).min(k)).collect();
                    rows.sort_by(|&a, &b| w[b * n + col].abs().total_cmp(&w[a * n + col].abs()).then(a.cmp(&b)));
                    for &r in rows.iter().take(keep) {
                        mask[r * n + col] = true;
                    }
                }
            }
            mask
        }
        PruneKind::Structured(_) => vec![true; w.len()],
    }
}

/// Output columns the error estimate looks at (evenly strided when a layer has more): the exact
/// `tr(Dᵀ H D)` over every column costs as much as the pruning itself.
const ERROR_COLUMNS: usize = 128;

/// `Σ_c d_cᵀ H d_c` over columns `cols` of `D` `[K, N]`.
fn quad_form(h: &Gram, d: &[f64], n: usize, cols: &[usize]) -> f64 {
    let k = h.k;
    let mut total = 0.0;
    let mut dc = vec![0f64; k];
    for &c in cols {
        for (r, x) in dc.iter_mut().enumerate() {
            *x = d[r * n + c];
        }
        for i in 0..k {
            if dc[i] != 0.0 {
                total += dc[i] * linalg::dot(&h.h[i * k..i * k + k], &dc);
            }
        }
    }
    total
}

/// Relative output error `‖X(W'−W)‖² / ‖XW‖²` of replacing `w` by `w2` on the rows behind `h`
/// (exact up to `ERROR_COLUMNS` output columns, estimated on that many strided columns beyond).
pub fn rel_error(h: &Gram, w: &[f64], w2: &[f64], n: usize) -> f64 {
    let d: Vec<f64> = w.iter().zip(w2).map(|(a, b)| b - a).collect();
    let cols: Vec<usize> =
        if n <= ERROR_COLUMNS { (0..n).collect() } else { (0..ERROR_COLUMNS).map(|i| i * n / ERROR_COLUMNS).collect() };
    let base = quad_form(h, w, n, &cols);
    if base > 0.0 {
        quad_form(h, &d, n, &cols) / base
    } else {
        0.0
    }
}

/// Masked least-squares recovery in one OBS sweep: zeroes the weights `mask` drops and compensates
/// each through the upper factor `u` of `(H + λI)⁻¹` (`linalg::inverse_upper_factor`).
pub fn obs_sweep(w: &mut [f64], k: usize, n: usize, mask: &[bool], u: &[f64]) {
    // Columns are independent: split them over the CPUs in contiguous blocks.
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(n / 32).max(1);
    if threads > 1 {
        let bounds: Vec<usize> = (0..=threads).map(|t| t * n / threads).collect();
        let parts: Vec<(Vec<f64>, Vec<bool>)> = bounds
            .windows(2)
            .map(|b| {
                let (c0, c1) = (b[0], b[1]);
                let w: Vec<f64> = (0..k).flat_map(|r| w[r * n + c0..r * n + c1].iter().copied()).collect();
                let m: Vec<bool> = (0..k).flat_map(|r| mask[r * n + c0..r * n + c1].iter().copied()).collect();
                (w, m)
            })
            .collect();
        let done: Vec<Vec<f64>> = std::thread::scope(|s| {
            let handles: Vec<_> = parts
                .into_iter()
                .zip(bounds.windows(2))
                .map(|((mut pw, pm), b)| {
                    let cols = b[1] - b[0];
                    s.spawn(move || {
                        obs_sweep_serial(&mut pw, k, cols, &pm, u);
                        pw
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("no panics in the sweep")).collect()
        });
        for (pw, b) in done.iter().zip(bounds.windows(2)) {
            let cols = b[1] - b[0];
            for r in 0..k {
                w[r * n + b[0]..r * n + b[1]].copy_from_slice(&pw[r * cols..(r + 1) * cols]);
            }
        }
        return;
    }
    obs_sweep_serial(w, k, n, mask, u);
}

fn obs_sweep_serial(w: &mut [f64], k: usize, n: usize, mask: &[bool], u: &[f64]) {
    let mut err = vec![0f64; n];
    for i in 0..k {
        let d = u[i * k + i];
        let mut any = false;
        for j in 0..n {
            if !mask[i * n + j] {
                err[j] = w[i * n + j] / d;
                w[i * n + j] = 0.0;
                any = true;
            } else {
                err[j] = 0.0;
            }
        }
        if !any {
            continue;
        }
        for r in i + 1..k {
            let c = u[i * k + r];
            if c != 0.0 {
                for (x, &e) in w[r * n..r * n + n].iter_mut().zip(&err) {
                    *x -= c * e;
                }
            }
        }
    }
    // Masked entries that later updates touched are zero by construction (row i is final once
    // visited); kept entries carry the compensation.
}

/// Prunes one matrix (`[K, N]`) with an N:M / unstructured mask; with the input's Gram matrix and
/// the inverse factor of its damped form, recovers it.
/// `start` is the dense weight the sweep starts from (default `w`; corrective recovery starts from the
/// least-squares fit to the original outputs).
fn prune_sparse(
    w: &[f64],
    l: &Linear,
    kind: &PruneKind,
    h: Option<(&Gram, &[f64])>,
    start: Option<Vec<f64>>,
) -> (Vec<f64>, Option<f64>) {
    let mask = magnitude_mask(w, l.k, l.n, kind);
    let Some((h, u)) = h else {
        let out = w.iter().zip(&mask).map(|(&x, &m)| if m { x } else { 0.0 }).collect();
        return (out, None);
    };
    let mut out = start.unwrap_or_else(|| w.to_vec());
    obs_sweep(&mut out, l.k, l.n, &mask, u);
    let e = rel_error(h, w, &out, l.n);
    (out, Some(e))
}

fn check_layer(l: &Linear, kind: &PruneKind) -> Result<()> {
    if let PruneKind::NofM { m, .. } = kind {
        if !l.k.is_multiple_of(*m) {
            return Err(Error::invalid(format!(
                "N:M pruning needs the input width to be a multiple of {m}; a layer has K = {}",
                l.k
            )));
        }
    }
    Ok(())
}

/// Prunes `g` in place. `calib` holds token sequences of equal length (one batch) for specs that
/// need calibration. Runs shape inference and dead-code elimination afterwards.
pub fn prune(g: &mut Graph, spec: &PruneSpec, spec_text: &str, calib: Option<&[Vec<u32>]>) -> Result<PruneReport> {
    let t0 = Instant::now();
    let (bytes_before, _) = param_bytes(g);
    let calib = match (spec.needs_calibration(), calib) {
        (true, None) => {
            return Err(Error::invalid(format!("--prune {spec_text} needs calibration data (--calibrate FILE)")))
        }
        (true, Some(c)) => Some(c),
        (false, _) => None,
    };
    let mut report = PruneReport {
        spec: spec_text.to_string(),
        calib_tokens: calib.map_or(0, |c| c.iter().map(Vec::len).sum()),
        ..Default::default()
    };
    match &spec.kind {
        PruneKind::Structured(f) => structured::prune(g, *f, spec, calib.expect("checked"), &mut report)?,
        kind => {
            let layers = prunable_layers(g);
            if layers.is_empty() {
                return Err(Error::invalid("the model has no prunable linear layers (constant-weight MatMul/Gemm)"));
            }
            for l in &layers {
                check_layer(l, kind)?;
            }
            let mut results: HashMap<NodeIndex, (Vec<f64>, Option<f64>)> = HashMap::new();
            match (spec.recover, calib) {
                (Recover::None, _) | (_, None) => {
                    for l in &layers {
                        results.insert(l.node, prune_sparse(&weight_kn(g, l), l, kind, None, None));
                    }
                }
                (recover, Some(seqs)) => {
                    let by_node: HashMap<NodeIndex, &Linear> = layers.iter().map(|l| (l.node, l)).collect();
                    let sequential = recover != Recover::OneShot;
                    let gref: &Graph = g;
                    let mut grams = GramCache::new(&layers);
                    run_layers(gref, seqs, recover == Recover::Corrective, &mut |n, x, x_orig| {
                        let Some(l) = by_node.get(&n) else { return Ok(None) };
                        let (h, u) = grams.get_with_factor(l, x, spec.damp)?;
                        let w = weight_kn(gref, l);
                        // Corrective: start from W* = (H_p + λI)⁻¹ X_pᵀX_o W, the dense least-squares
                        // fit of the original outputs (the masked objective is then ‖X_p(W' − W*)‖²).
                        let start = x_orig.map(|xo| {
                            let mut t = grams.cross_times(l, x, xo, &w);
                            linalg::inverse_apply(&u, l.k, &mut t, l.n);
                            t
                        });
                        let (w2, e) = prune_sparse(&w, l, kind, Some((&h, &u)), start);
                        grams.done(l);
                        let t = weight_tensor(l, &w2);
                        results.insert(n, (w2, e));
                        Ok(sequential.then_some(t))
                    })?;
                }
            }
            for l in &layers {
                let (w2, e) = results.remove(&l.node).ok_or_else(|| {
                    Error::invalid(format!("linear layer '{}' did not run during calibration", g.g[l.node].name))
                })?;
                let t = weight_tensor(l, &w2);
                let name = g.const_of(l.weight).map_or(String::new(), |c| c.name.clone());
                let nz = w2.iter().filter(|&&x| x != 0.0).count();
                replace_weight(g, l, &t);
                report.layers.push(LayerReport {
                    name,
                    shape_before: t.shape.clone(),
                    shape_after: t.shape.clone(),
                    nonzeros: nz,
                    sparsity: 1.0 - nz as f64 / w2.len().max(1) as f64,
                    rel_error: e,
                });
            }
        }
    }
    super::shape_infer::infer_shapes(g)?;
    super::Pass::run(&super::dce::Dce, g)?;
    let (after, nz) = param_bytes(g);
    report.param_bytes_before = bytes_before;
    report.param_bytes_after = after;
    report.nonzero_bytes_after = nz;
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// The upper factor `U` of `(H + λI)⁻¹` (`linalg::inverse_upper_factor`), row-major K×K.
pub type InverseFactor = Vec<f64>;

/// Gram matrices of layer inputs during one hooked run, each computed once and dropped when the
/// last layer reading it is done (a 30-block model's Grams would otherwise take ~1 GB).
pub struct GramCache {
    grams: HashMap<ValueRef, (Rc<Gram>, Option<Rc<InverseFactor>>)>,
    cross: HashMap<ValueRef, Rc<Vec<f64>>>,
    pending: HashMap<ValueRef, usize>,
}

impl GramCache {
    pub fn new(layers: &[Linear]) -> GramCache {
        let mut pending = HashMap::new();
        for l in layers {
            *pending.entry(l.input).or_insert(0) += 1;
        }
        GramCache { grams: HashMap::new(), cross: HashMap::new(), pending }
    }

    pub fn get(&mut self, l: &Linear, x: &[f32]) -> Rc<Gram> {
        self.grams
            .entry(l.input)
            .or_insert_with(|| {
                let mut h = Gram::new(l.k);
                h.add_rows(x);
                (Rc::new(h), None)
            })
            .0
            .clone()
    }

    /// The Gram matrix and the upper factor of `(H + λI)⁻¹` (shared by layers reading one input).
    pub fn get_with_factor(
        &mut self,
        l: &Linear,
        x: &[f32],
        damp: f64,
    ) -> std::result::Result<(Rc<Gram>, Rc<Vec<f64>>), String> {
        let h = self.get(l, x);
        let entry = self.grams.get_mut(&l.input).expect("inserted by get");
        if entry.1.is_none() {
            let u = linalg::inverse_upper_factor(&linalg::damped(&h.h, h.k, damp), h.k)?;
            entry.1 = Some(Rc::new(u));
        }
        Ok((h, entry.1.clone().expect("set above")))
    }

    /// `X_pᵀX_o · W` (`[K, N]`) for a layer's input in the pruned (`x`) and original (`x_orig`)
    /// models; the cross Gram is shared by layers reading one input.
    pub fn cross_times(&mut self, l: &Linear, x: &[f32], x_orig: &[f32], w: &[f64]) -> Vec<f64> {
        let c = self.cross.entry(l.input).or_insert_with(|| Rc::new(calib::cross_gram(x, x_orig, l.k))).clone();
        let (k, n) = (l.k, l.n);
        let mut out = vec![0f64; k * n];
        for i in 0..k {
            let row = &mut out[i * n..i * n + n];
            for j in 0..k {
                let cij = c[i * k + j];
                if cij != 0.0 {
                    for (o, &y) in row.iter_mut().zip(&w[j * n..j * n + n]) {
                        *o += cij * y;
                    }
                }
            }
        }
        out
    }

    pub fn done(&mut self, l: &Linear) {
        if let Some(p) = self.pending.get_mut(&l.input) {
            *p -= 1;
            if *p == 0 {
                self.grams.remove(&l.input);
                self.cross.remove(&l.input);
            }
        }
    }
}

/// See `run_layers`.
pub type LayerHook<'a> =
    dyn FnMut(NodeIndex, &[f32], Option<&[f32]>) -> std::result::Result<Option<Tensor>, String> + 'a;

/// Runs the calibration batch through `g`; `f(node, x, x_orig)` sees each MatMul/Gemm with its
/// input 0 as f32 (when it is f32) and may return a replacement for input 1 (a weight).
///
/// `paired` runs the batch twice side by side: the first copy keeps the original weights, the
/// second gets the replacements (a MatMul's weight becomes `[2B, K, N]`, the original B times then
/// the new one B times), and `f` sees the second copy's rows as `x` and the first's as `x_orig`.
pub fn run_layers(g: &Graph, seqs: &[Vec<u32>], paired: bool, f: &mut LayerHook) -> Result<()> {
    let doubled: Vec<Vec<u32>>;
    let seqs = if paired {
        doubled = seqs.iter().chain(seqs).cloned().collect();
        &doubled[..]
    } else {
        seqs
    };
    let batch = seqs.len();
    let feeds = calib::lm_feeds(g, seqs)?;
    // The output projection is never pruned: stop the run at its input (lm_head is ~20 % of the
    // FLOPs of a small LM). Node indices are stable, so the hook's keys still hold.
    let mut trimmed = g.clone();
    for l in calib::linear_layers(g).iter().filter(|l| is_output_projection(g, l)) {
        for o in trimmed.outputs.iter_mut() {
            if o.value == (ValueRef { node: l.node, slot: 0 }) {
                o.value = l.input;
            }
        }
    }
    super::Pass::run(&super::dce::Dce, &mut trimmed)?;
    let interp = Interpreter::new(&trimmed)?;
    interp.run_hooked(&feeds, &mut |n, args| {
        let Some(x) = args.first().copied().flatten() else { return Ok(None) };
        if x.dtype() != DType::F32 || !matches!(g.g[n].op, Op::MatMul | Op::Gemm { .. }) {
            return Ok(None);
        }
        let xs = x.as_slice::<f32>()?;
        if !paired {
            return Ok(f(n, xs, None)?.map(|t| (1, t)));
        }
        let w = args.get(1).copied().flatten();
        let Some(w) = w.filter(|w| w.rank() == 2 && matches!(g.g[n].op, Op::MatMul) && x.rank() == 3) else {
            return Ok(None);
        };
        if x.shape[0] != batch {
            return Err(format!("corrective recovery expects batch {batch} at '{}'", g.g[n].name));
        }
        let half = xs.len() / 2;
        let Some(new) = f(n, &xs[half..], Some(&xs[..half]))? else { return Ok(None) };
        let (old, new) = (w.as_slice::<f32>()?, new.as_slice::<f32>()?);
        let mut stacked = Vec::with_capacity(old.len() * batch);
        for b in 0..batch {
            stacked.extend_from_slice(if b < batch / 2 { old } else { new });
        }
        let shape = vec![batch, w.shape[0], w.shape[1]];
        Ok(Some((1, Tensor::from_vec(shape, stacked))))
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(n: usize, seed: u64) -> Vec<f64> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((x >> 11) as f64 / (1u64 << 53) as f64) - 0.5
            })
            .collect()
    }

    #[test]
    fn threaded_obs_sweep_matches_the_serial_one() {
        let (k, n) = (24, 100);
        let xs: Vec<f32> = lcg(64 * k, 1).iter().map(|&v| v as f32).collect();
        let mut h = Gram::new(k);
        h.add_rows(&xs);
        let u = linalg::inverse_upper_factor(&linalg::damped(&h.h, k, 0.01), k).unwrap();
        let w = lcg(k * n, 2);
        let mask = magnitude_mask(&w, k, n, &PruneKind::NofM { n: 2, m: 4 });
        let (mut a, mut b) = (w.clone(), w.clone());
        obs_sweep(&mut a, k, n, &mask, &u);
        obs_sweep_serial(&mut b, k, n, &mask, &u);
        assert_eq!(a, b);
        assert!(a.iter().zip(&mask).all(|(&x, &m)| m || x == 0.0));
        assert!(
            rel_error(&h, &w, &a, n)
                < rel_error(
                    &h,
                    &w,
                    &w.iter().zip(&mask).map(|(&x, &m)| if m { x } else { 0.0 }).collect::<Vec<_>>(),
                    n
                )
        );
    }
}

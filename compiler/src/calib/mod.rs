//! Calibration: run a model on real text and collect, for every linear layer (a `MatMul`, or a
//! `Gemm` without `transA`, whose weight is a constant matrix), the statistics of its input
//! activations that compression passes need:
//!
//! - the Gram matrix `H = XᵀX` (K×K, accumulated in f64) over all calibration rows `X` (one row per
//!   token, K = the layer's input width). Layer-wise error-minimising compression (pruning with
//!   least-squares recovery here, GPTQ later) minimises `‖X·W − X·W'‖² = tr((W−W')ᵀ H (W−W'))`, so
//!   `H` is all it needs from the data;
//! - per-channel min / max / |x| percentile, for static activation quantization.
//!
//! Layers that read the same value (q/k/v projections, gate/up) share one entry: both maps are keyed
//! by the input value, and `Calibration::gram_for(graph, matmul_node)` finds a layer's entry.
//! Activations come from the reference interpreter with an observer hook (`Interpreter::run_observed`):
//! all sequences run as one batch, so the whole model runs once.
//!
//! ```text
//! let seqs = calib::token_sequences(&tokenizer_json, &text, 1024, 512)?;
//! let cal = calib::Calibration::collect(&graph, &seqs, &calib::Options::default())?;
//! for l in calib::linear_layers(&graph) {
//!     let h = cal.gram_for(&graph, l.node).unwrap(); // h.get(i, j), h.k, h.rows
//! }
//! ```

pub mod linalg;

use crate::error::{Error, Result};
use crate::interp::Interpreter;
use crate::ir::{DType, Graph, Op, Tensor, ValueRef};
use petgraph::stable_graph::NodeIndex;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Instant;

/// A linear layer: `y = x · W` with a constant weight.
#[derive(Clone, Debug, PartialEq)]
pub struct Linear {
    pub node: NodeIndex,
    /// The activation input (`x`, input 0).
    pub input: ValueRef,
    /// The constant weight (input 1).
    pub weight: ValueRef,
    /// Input width (rows of W in `[K, N]` layout).
    pub k: usize,
    /// Output width.
    pub n: usize,
    /// The weight is stored `[N, K]` (Gemm with `transB`).
    pub transposed: bool,
}

impl Linear {
    /// Index of `W[k][n]` in the weight constant's element order.
    pub fn index(&self, k: usize, n: usize) -> usize {
        if self.transposed {
            n * self.k + k
        } else {
            k * self.n + n
        }
    }
}

/// Every linear layer of the graph with a constant f32 2-D weight, in topological order.
pub fn linear_layers(g: &Graph) -> Vec<Linear> {
    let Ok(order) = g.topo_order() else { return Vec::new() };
    let mut out = Vec::new();
    for n in order {
        let transposed = match &g.g[n].op {
            Op::MatMul => false,
            Op::Gemm { trans_a: false, trans_b, .. } => *trans_b,
            _ => continue,
        };
        let ins = g.inputs_of(n);
        let (Some(Some(input)), Some(Some(weight))) = (ins.first(), ins.get(1)) else { continue };
        let Some(c) = g.const_of(*weight) else { continue };
        if c.dtype != DType::F32 || c.shape.len() != 2 || g.const_of(*input).is_some() {
            continue;
        }
        let (k, n_out) = if transposed { (c.shape[1], c.shape[0]) } else { (c.shape[0], c.shape[1]) };
        out.push(Linear { node: n, input: *input, weight: *weight, k, n: n_out, transposed });
    }
    out
}

/// `H = XᵀX` over calibration rows, full symmetric K×K, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Gram {
    pub k: usize,
    /// Number of rows (tokens) accumulated.
    pub rows: usize,
    pub h: Vec<f64>,
}

/// Rows per block: products inside a block are summed in f32, blocks are summed in f64.
const BLOCK_ROWS: usize = 32;
/// H is updated in square tiles of this many channels, so a tile stays in cache.
const TILE: usize = 64;

impl Gram {
    pub fn new(k: usize) -> Gram {
        Gram { k, rows: 0, h: vec![0.0; k * k] }
    }

    pub fn get(&self, i: usize, j: usize) -> f64 {
        self.h[i * self.k + j]
    }

    /// Adds the rows of `x` (row-major, `x.len() / k` rows of `k`). Row bands of H are spread over
    /// the CPUs (the Gram of a 1536-wide input over 1k tokens is 2.4 G multiply-adds).
    pub fn add_rows(&mut self, x: &[f32]) {
        let k = self.k;
        let rows = x.len() / k;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(k.div_ceil(TILE)).max(1);
        products_by_band(x, x, k, rows, &mut self.h, threads, false);
        self.rows += rows;
        // Mirror the lower triangle (cheap next to the products, keeps `h` plainly symmetric).
        for i in 0..k {
            for j in i + 1..k {
                self.h[i * k + j] = self.h[j * k + i];
            }
        }
    }

    /// The mean square of each channel: `H_ii / rows`.
    pub fn channel_mean_sq(&self) -> Vec<f64> {
        let r = self.rows.max(1) as f64;
        (0..self.k).map(|i| self.get(i, i) / r).collect()
    }
}

/// `out += Aᵀ·B` for row-major `rows × k` matrices (`lower`: only the lower triangle, for `A = B`),
/// row bands of `out` spread over `threads`.
fn products_by_band(a: &[f32], b: &[f32], k: usize, rows: usize, out: &mut [f64], threads: usize, full: bool) {
    let mut bands: Vec<Vec<(usize, &mut [f64])>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, band) in out.chunks_mut(TILE * k).enumerate() {
        bands[i % threads].push((i * TILE, band));
    }
    std::thread::scope(|s| {
        for mine in bands {
            s.spawn(move || {
                let mut tile = vec![0f32; TILE * TILE];
                for (i0, band) in mine {
                    gram_band(a, b, k, rows, i0, band, &mut tile, full);
                }
            });
        }
    });
}

/// `XaᵀXb` over calibration rows (K×K row-major, not symmetric): the cross term of fitting a layer
/// fed `Xa` (the pruned model's activations) to the outputs it has on `Xb` (the original model's).
pub fn cross_gram(xa: &[f32], xb: &[f32], k: usize) -> Vec<f64> {
    let rows = xa.len() / k;
    let mut out = vec![0f64; k * k];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(k.div_ceil(TILE)).max(1);
    products_by_band(xa, xb, k, rows.min(xb.len() / k), &mut out, threads, true);
    out
}

/// Rows `i0..i0+TILE` of `AᵀB` (lower triangle only unless `full`) added into `band` (those rows of
/// the output), tile by tile.
#[allow(clippy::too_many_arguments)]
fn gram_band(xa: &[f32], xb: &[f32], k: usize, rows: usize, i0: usize, band: &mut [f64], tile: &mut [f32], full: bool) {
    let i1 = (i0 + TILE).min(k);
    let j_end = if full { k } else { i0 + 1 };
    for r0 in (0..rows).step_by(BLOCK_ROWS) {
        let ablock = &xa[r0 * k..(r0 + BLOCK_ROWS).min(rows) * k];
        let bblock = &xb[r0 * k..(r0 + BLOCK_ROWS).min(rows) * k];
        for j0 in (0..j_end).step_by(TILE) {
            let j1 = (j0 + TILE).min(k);
            let w = j1 - j0;
            tile.fill(0.0);
            for (row, brow) in ablock.chunks_exact(k).zip(bblock.chunks_exact(k)) {
                let xj = &brow[j0..j1];
                for i in i0..i1 {
                    let xi = row[i];
                    let t = &mut tile[(i - i0) * TILE..(i - i0) * TILE + w];
                    for (tv, &xv) in t.iter_mut().zip(xj) {
                        *tv += xi * xv;
                    }
                }
            }
            for i in i0..i1 {
                let hrow = &mut band[(i - i0) * k + j0..(i - i0) * k + j1];
                for (hv, &tv) in hrow.iter_mut().zip(&tile[(i - i0) * TILE..(i - i0) * TILE + w]) {
                    *hv += tv as f64;
                }
            }
        }
    }
}

/// Per-channel activation statistics (for static activation quantization).
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelStats {
    pub min: Vec<f32>,
    pub max: Vec<f32>,
    /// The `Options::percentile` percentile of |x| per channel (nearest rank).
    pub abs_percentile: Vec<f32>,
    /// The same percentile over every value of the tensor (per-tensor static quantization).
    pub tensor_abs_percentile: f32,
    pub rows: usize,
}

/// Largest |x| values per channel, enough for the percentile's nearest rank.
struct TopAbs {
    keep: usize,
    /// Per channel, the largest `keep` |x| as a min-heap of their bits (a non-negative f32's bits
    /// order like its value), so each row costs O(log keep), not a shifting insert.
    top: Vec<BinaryHeap<Reverse<u32>>>,
    /// The largest `keep_all` over all channels.
    all: BinaryHeap<Reverse<u32>>,
    keep_all: usize,
    min: Vec<f32>,
    max: Vec<f32>,
    rows: usize,
}

/// Offers `a` to a min-heap holding the largest `keep` values.
fn offer(heap: &mut BinaryHeap<Reverse<u32>>, keep: usize, a: u32) {
    if heap.len() < keep {
        heap.push(Reverse(a));
    } else if heap.peek().is_some_and(|&Reverse(low)| a > low) {
        heap.pop();
        heap.push(Reverse(a));
    }
}

/// A heap's values, ascending.
fn ascending(heap: BinaryHeap<Reverse<u32>>) -> Vec<f32> {
    let mut v: Vec<u32> = heap.into_iter().map(|Reverse(b)| b).collect();
    v.sort_unstable();
    v.into_iter().map(f32::from_bits).collect()
}

impl TopAbs {
    /// `keep` values per channel, `keep_all` over the whole tensor.
    fn new(k: usize, keep: usize, keep_all: usize) -> TopAbs {
        TopAbs {
            keep,
            top: vec![BinaryHeap::with_capacity(keep + 1); k],
            all: BinaryHeap::with_capacity(keep_all + 1),
            keep_all,
            min: vec![f32::INFINITY; k],
            max: vec![f32::NEG_INFINITY; k],
            rows: 0,
        }
    }

    fn add_rows(&mut self, x: &[f32]) {
        let k = self.min.len();
        for row in x.chunks_exact(k) {
            for (c, &v) in row.iter().enumerate() {
                self.min[c] = self.min[c].min(v);
                self.max[c] = self.max[c].max(v);
                let a = v.abs().to_bits();
                offer(&mut self.top[c], self.keep, a);
                offer(&mut self.all, self.keep_all, a);
            }
            self.rows += 1;
        }
    }

    fn finish(self, percentile: f64) -> ChannelStats {
        // Nearest rank from the top: the value with `above` larger ones.
        let above = ((1.0 - percentile / 100.0) * self.rows as f64).floor() as usize;
        let nearest =
            |t: &[f32], above: usize| if t.is_empty() { 0.0 } else { t[t.len() - 1 - above.min(t.len() - 1)] };
        let abs_percentile = self.top.into_iter().map(|t| nearest(&ascending(t), above)).collect();
        let above_all = ((1.0 - percentile / 100.0) * (self.rows * self.min.len()) as f64).floor() as usize;
        let tensor_abs_percentile = nearest(&ascending(self.all), above_all);
        ChannelStats { min: self.min, max: self.max, abs_percentile, tensor_abs_percentile, rows: self.rows }
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    /// Percentile of |x| recorded per channel (e.g. 99.9).
    pub percentile: f64,
    /// Also collect per-channel statistics (costs a little time per row).
    pub channel_stats: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { percentile: 99.9, channel_stats: true }
    }
}

/// Activation statistics of every linear layer's input.
#[derive(Clone, Debug, Default)]
pub struct Calibration {
    /// Keyed by the layer's input value (shared by layers reading the same activation).
    pub gram: HashMap<ValueRef, Gram>,
    pub stats: HashMap<ValueRef, ChannelStats>,
    /// Tokens the model ran on (= rows of every Gram).
    pub tokens: usize,
    /// Wall time of the calibration run.
    pub seconds: f64,
}

impl Calibration {
    /// Runs `g` on `seqs` (token sequences of equal length, one batch) and collects the statistics.
    pub fn collect(g: &Graph, seqs: &[Vec<u32>], opts: &Options) -> Result<Calibration> {
        let t0 = Instant::now();
        let layers = linear_layers(g);
        let inputs: HashMap<NodeIndex, ValueRef> = layers.iter().map(|l| (l.node, l.input)).collect();
        let feeds = lm_feeds(g, seqs)?;
        let tokens: usize = seqs.iter().map(Vec::len).sum();
        let keep = (((1.0 - opts.percentile / 100.0) * tokens as f64).floor() as usize + 1).max(1);
        let mut cal = Calibration { tokens, ..Default::default() };
        let mut tops: HashMap<ValueRef, TopAbs> = HashMap::new();
        let interp = Interpreter::new(g)?;
        let mut bad: Option<String> = None;
        interp.run_observed(&feeds, &mut |n, args| {
            let Some(&v) = inputs.get(&n) else { return };
            if cal.gram.contains_key(&v) {
                return;
            }
            let Some(x) = args[0].and_then(|t| t.as_slice::<f32>().ok()) else {
                bad = Some(format!("the input of linear layer '{}' is not f32", g.g[n].name));
                return;
            };
            let k = *args[0].unwrap().shape.last().unwrap_or(&1);
            let mut h = Gram::new(k);
            h.add_rows(x);
            cal.gram.insert(v, h);
            if opts.channel_stats {
                let keep_all = ((1.0 - opts.percentile / 100.0) * (tokens * k) as f64).floor() as usize + 1;
                let mut t = TopAbs::new(k, keep, keep_all);
                t.add_rows(x);
                tops.insert(v, t);
            }
        })?;
        if let Some(e) = bad {
            return Err(Error::invalid(e));
        }
        cal.stats = tops.into_iter().map(|(v, t)| (v, t.finish(opts.percentile))).collect();
        cal.seconds = t0.elapsed().as_secs_f64();
        Ok(cal)
    }

    /// The Gram matrix of a linear layer's input (`None` for nodes that are not linear layers or
    /// did not run).
    pub fn gram_for(&self, g: &Graph, matmul: NodeIndex) -> Option<&Gram> {
        let input = g.inputs_of(matmul).first().copied().flatten()?;
        self.gram.get(&input)
    }

    pub fn stats_for(&self, g: &Graph, matmul: NodeIndex) -> Option<&ChannelStats> {
        let input = g.inputs_of(matmul).first().copied().flatten()?;
        self.stats.get(&input)
    }
}

/// Tokenizes `text` with a Hugging Face `tokenizer.json` and takes `tokens` tokens as sequences of
/// `seq_len`, spread evenly over the text (so calibration sees more than its first pages).
pub fn token_sequences(tokenizer_json: &[u8], text: &str, tokens: usize, seq_len: usize) -> Result<Vec<Vec<u32>>> {
    if seq_len == 0 || tokens == 0 {
        return Err(Error::invalid("calibration needs at least one token and a sequence length of at least 1"));
    }
    let tok = tokenizers::Tokenizer::from_bytes(tokenizer_json)
        .map_err(|e| Error::invalid(format!("calibration tokenizer: {e}")))?;
    let ids = tok.encode(text, false).map_err(|e| Error::invalid(format!("calibration tokenizer: {e}")))?;
    let ids = ids.get_ids();
    let seq_len = seq_len.min(tokens);
    let n = tokens.div_ceil(seq_len);
    if ids.len() < seq_len * n {
        return Err(Error::invalid(format!(
            "the calibration text has {} tokens, {} are needed ({n} sequences of {seq_len})",
            ids.len(),
            seq_len * n
        )));
    }
    // Evenly spaced starts; consecutive starts are at least seq_len apart, so sequences never overlap.
    let span = ids.len() - seq_len;
    Ok((0..n).map(|i| ids[i * span / (n - 1).max(1)..][..seq_len].to_vec()).collect())
}

/// Feeds for a causal LM graph (the shapes `edgec_runtime::lm` understands): `input_ids`, an
/// all-ones `attention_mask`, `position_ids` 0.., and empty `past_key_values.*`; one batch row per
/// sequence.
pub fn lm_feeds(g: &Graph, seqs: &[Vec<u32>]) -> Result<Vec<(String, Tensor)>> {
    let b = seqs.len();
    let t = seqs.first().map_or(0, Vec::len);
    if b == 0 || t == 0 || seqs.iter().any(|s| s.len() != t) {
        return Err(Error::invalid("calibration sequences must be non-empty and of equal length"));
    }
    let mut feeds = Vec::new();
    for &n in &g.inputs {
        let out = &g.g[n].outputs[0];
        let name = out.name.clone();
        let t = match name.as_str() {
            "input_ids" => Tensor::from_vec(vec![b, t], seqs.iter().flatten().map(|&i| i as i64).collect()),
            "attention_mask" => Tensor::from_vec(vec![b, t], vec![1i64; b * t]),
            "position_ids" => Tensor::from_vec(vec![b, t], (0..b).flat_map(|_| 0..t as i64).collect()),
            p if p.starts_with("past_key_values.") => {
                let dims = out.ty.shape.as_ref().ok_or_else(|| Error::invalid(format!("input '{p}' has no shape")))?;
                let shape: Vec<usize> = dims
                    .iter()
                    .enumerate()
                    .map(|(a, d)| d.as_fixed().map_or(if a == 0 { b } else { 0 }, |v| v as usize))
                    .collect();
                Tensor::from_vec(shape, Vec::<f32>::new())
            }
            other => {
                return Err(Error::invalid(format!(
                    "calibration runs causal LMs (input_ids, attention_mask, position_ids, past_key_values.*); \
                     the model has input '{other}'"
                )))
            }
        };
        let t = if out.ty.dtype != t.dtype() { t.cast(out.ty.dtype) } else { t };
        feeds.push((name, t));
    }
    if !feeds.iter().any(|(n, _)| n == "input_ids") {
        return Err(Error::invalid("calibration needs a causal LM with an `input_ids` input"));
    }
    Ok(feeds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threaded_gram_equals_the_plain_sum() {
        let (k, rows) = (200, 70);
        let x: Vec<f32> = (0..k * rows).map(|i| ((i * 7919 % 101) as f32 - 50.0) / 25.0).collect();
        let mut h = Gram::new(k);
        h.add_rows(&x[..k * 33]);
        h.add_rows(&x[k * 33..]);
        assert_eq!(h.rows, rows);
        let rev: Vec<f32> = x.iter().rev().copied().collect();
        let c = cross_gram(&x, &rev, k);
        for (i, j) in [(0, 0), (3, 150), (199, 7), (120, 120)] {
            let want: f64 = (0..rows).map(|r| x[r * k + i] as f64 * rev[r * k + j] as f64).sum();
            assert!((c[i * k + j] - want).abs() <= 1e-5 * (1.0 + want.abs()), "C[{i},{j}]");
        }
        for i in 0..k {
            for j in 0..k {
                let want: f64 = (0..rows).map(|r| x[r * k + i] as f64 * x[r * k + j] as f64).sum();
                assert!((h.get(i, j) - want).abs() <= 1e-5 * (1.0 + want.abs()), "H[{i},{j}]");
            }
        }
    }

    #[test]
    fn percentile_is_the_nearest_rank_of_abs() {
        let mut t = TopAbs::new(1, 3, 3);
        t.add_rows(&(1..=100).map(|v| -(v as f32)).collect::<Vec<_>>());
        let s = t.finish(98.0);
        assert_eq!((s.min[0], s.max[0], s.abs_percentile[0], s.tensor_abs_percentile), (-100.0, -1.0, 98.0, 98.0));
        // Over the tensor: 2 channels x 100 rows, the 98th percentile has 4 values above it.
        let mut t = TopAbs::new(2, 3, 5);
        t.add_rows(&(1..=200).map(|v| v as f32).collect::<Vec<_>>());
        let s = t.finish(98.0);
        assert_eq!((s.abs_percentile, s.tensor_abs_percentile), (vec![195.0, 196.0], 196.0));
    }
}

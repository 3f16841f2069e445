//! Activation smoothing (SmoothQuant): moves the outlier channels of a linear layer's input into
//! its weight, so that one int8 scale per tensor (static activation quantization) fits the input.
//!
//! For an input X read by linear layers W_1..W_m (e.g. q, k, v), each input channel j gets a
//! factor `s_j = max|X_j|^α / max_i max_n |W_i[j, n]|^(1-α)`; the layers read `X_j / s_j` and
//! their weight rows become `s_j · W_i[j, :]`, so every product is unchanged. The division is
//! folded into whatever produced X, at compile time, where that is exact:
//! - a normalization with a constant scale (RMSNorm, LayerNorm): `γ_j / s_j` (and `β_j / s_j`),
//!   when only these linear layers read its output;
//! - a product `a * b` where `b` is another linear layer's output read only there (SwiGLU's up
//!   projection before the down projection): that layer's weight columns `W_up[:, j] / s_j`.
//!
//! Other inputs are left as they are: inputs read elsewhere, and attention outputs (o_proj's
//! input), whose division could only go into v_proj's columns, which would change the values a
//! decoder-with-past graph returns as its `present` KV cache. In f32 the
//! rewrite is exact up to rounding; `max|X_j|` comes from a calibration run (`calib`).
//!
//! The same rewrite with other factors is AWQ (activation-aware weight quantization, `Strength::Awq`):
//! scaling up the input channels that carry large activations before rounding the weights.

use super::prune::{replace_weight, weight_kn, weight_tensor};
use crate::calib::{linear_layers, Calibration, ChannelStats, Gram, Linear};
use crate::error::Result;
use crate::ir::{BinaryOp, Graph, Op, Tensor, ValueRef};

/// Factors are kept within [1/LIMIT, LIMIT]: a channel that never fired (max |x| = 0) or an
/// all-zero weight row would otherwise give 0 or infinity.
const LIMIT: f64 = 1e4;

/// What smoothing changed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SmoothReport {
    /// Inputs smoothed and the linear layers reading them.
    pub inputs: usize,
    pub layers: usize,
    /// Largest and smallest factor applied.
    pub max_factor: f64,
    pub min_factor: f64,
}

/// Where the division by `s` goes.
enum Fold {
    /// The constant scale (input 1) and optional bias (input 2) of a normalization node.
    Norm { node: petgraph::stable_graph::NodeIndex },
    /// The columns of a linear layer whose output is one factor of the product.
    Columns(Linear),
}

/// How the factors are chosen.
pub enum Strength<'q> {
    /// SmoothQuant: `s_j = max|X_j|^α / max|W_j|^(1-α)`, to even out activation ranges (static
    /// int8 activations).
    Alpha(f32),
    /// Activation-aware weight scaling (AWQ): `s_j = rms(X_j)^α` (normalised to a geometric mean
    /// of 1), α per input from a grid, the one whose rounded weights (this pass's schemes, block
    /// ranges searched by activation energy as `Quantize::importance` will) give the least output
    /// error estimate `Σ_j E[X_j²] · ‖Q(s_j W_j) / s_j − W_j‖²`: channels that carry large
    /// activations get finer steps in their weight blocks.
    Awq(&'q super::quantize::Quantize),
}

/// The AWQ grid of α.
const AWQ_STEPS: usize = 10;
/// Output columns per layer that the AWQ search estimates the error on (at most).
const AWQ_COLUMNS: usize = 512;

/// Smooths every linear-layer input with a foldable producer, from the calibration statistics
/// (`Alpha` needs channel stats, `Awq` the Gram matrices).
pub fn smooth(g: &mut Graph, cal: &Calibration, strength: &Strength) -> Result<SmoothReport> {
    let layers = linear_layers(g);
    let mut groups: Vec<(ValueRef, Vec<Linear>)> = Vec::new();
    for l in &layers {
        match groups.iter_mut().find(|(v, _)| *v == l.input) {
            Some((_, ls)) => ls.push(l.clone()),
            None => groups.push((l.input, vec![l.clone()])),
        }
    }
    let mut report = SmoothReport { min_factor: f64::INFINITY, ..Default::default() };
    for (input, ls) in groups {
        let Some(fold) = fold_for(g, input, &ls, &layers) else { continue };
        // An earlier group may have replaced a weight (an up projection's rows, then its columns).
        let ls: Vec<Linear> = ls.iter().map(|l| current(g, l)).collect();
        let fold = match fold {
            Fold::Columns(up) => Fold::Columns(current(g, &up)),
            f => f,
        };
        let weights: Vec<Vec<f64>> = ls.iter().map(|l| weight_kn(g, l)).collect();
        let s = match strength {
            Strength::Alpha(alpha) => cal.stats.get(&input).and_then(|st| smoothquant(st, &ls, &weights, *alpha)),
            Strength::Awq(pass) => cal.gram.get(&input).map(|h| awq(g, h, &ls, &weights, pass)).transpose()?,
        };
        let Some(s) = s else { continue };
        let k = ls[0].k;
        for (l, mut w) in ls.iter().zip(weights) {
            for j in 0..k {
                for v in &mut w[j * l.n..(j + 1) * l.n] {
                    *v *= s[j];
                }
            }
            replace_weight(g, l, &weight_tensor(l, &w));
        }
        match fold {
            Fold::Norm { node } => {
                for slot in [1, 2] {
                    let Some(Some(v)) = g.inputs_of(node).get(slot).copied() else { continue };
                    let c = g.const_of(v).expect("checked by fold_for");
                    let name = c.name.clone();
                    let t: Vec<f32> = c.to_tensor().to_f64_vec().iter().zip(&s).map(|(x, s)| (x / s) as f32).collect();
                    let nc = g.add_const(name, &Tensor::from_vec(vec![k], t));
                    g.set_input(node, slot, nc);
                }
            }
            Fold::Columns(up) => {
                let mut w = weight_kn(g, &up);
                for row in w.chunks_mut(up.n) {
                    for (v, s) in row.iter_mut().zip(&s) {
                        *v /= s;
                    }
                }
                replace_weight(g, &up, &weight_tensor(&up, &w));
            }
        }
        report.inputs += 1;
        report.layers += ls.len();
        for &f in &s {
            report.max_factor = report.max_factor.max(f);
            report.min_factor = report.min_factor.min(f);
        }
    }
    if report.inputs == 0 {
        report.min_factor = 0.0;
    }
    Ok(report)
}

/// SmoothQuant's factors for one input (None when the statistics do not fit the layers).
fn smoothquant(st: &ChannelStats, ls: &[Linear], weights: &[Vec<f64>], alpha: f32) -> Option<Vec<f64>> {
    let k = ls[0].k;
    if st.max.len() != k {
        return None;
    }
    let alpha = alpha as f64;
    Some(
        (0..k)
            .map(|j| {
                let x = st.max[j].abs().max(st.min[j].abs()) as f64;
                let w = row_peak(ls, weights, j);
                if x == 0.0 || w == 0.0 {
                    return 1.0;
                }
                (x.powf(alpha) / w.powf(1.0 - alpha)).clamp(1.0 / LIMIT, LIMIT)
            })
            .collect(),
    )
}

/// The largest |w| in input channel `j` over the layers.
fn row_peak(ls: &[Linear], weights: &[Vec<f64>], j: usize) -> f64 {
    ls.iter().zip(weights).flat_map(|(l, w)| &w[j * l.n..(j + 1) * l.n]).fold(0f64, |m, v| m.max(v.abs()))
}

/// AWQ's factors for one input: the grid point with the least estimated output error (α = 0,
/// no scaling, is on the grid, so the estimate never gets worse than plain rounding).
fn awq(g: &Graph, h: &Gram, ls: &[Linear], weights: &[Vec<f64>], pass: &super::quantize::Quantize) -> Result<Vec<f64>> {
    let k = ls[0].k;
    let energy = h.channel_mean_sq();
    let rms: Vec<f64> = energy.iter().map(|e| e.sqrt().max(1e-8)).collect();
    // Each layer's scheme, as the quantize pass will choose it (f32 layers add no error).
    let schemes: Vec<Option<super::quantize::Scheme>> = ls.iter().map(|l| pass.layer_scheme(g, l)).collect();
    // The estimate sums over output columns independently: every `stride`-th column of a wide
    // layer (the lm_head's 49,152) estimates it as well for choosing α, at a fraction of the cost.
    let sampled: Vec<(usize, Vec<f64>)> = ls
        .iter()
        .zip(weights)
        .map(|(l, w)| {
            let stride = l.n.div_ceil(AWQ_COLUMNS).max(1);
            let cols: Vec<usize> = (0..l.n).step_by(stride).collect();
            let sub = (0..k).flat_map(|j| cols.iter().map(move |&c| w[j * l.n + c])).collect();
            (cols.len(), sub)
        })
        .collect();
    let mut best: Option<(f64, Vec<f64>)> = None;
    for step in 0..=AWQ_STEPS {
        let alpha = step as f64 / AWQ_STEPS as f64;
        let mut s: Vec<f64> = rms.iter().map(|r| r.powf(alpha)).collect();
        let (lo, hi) = s.iter().fold((f64::INFINITY, 0f64), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let mid = (lo * hi).sqrt();
        for v in &mut s {
            *v = (*v / mid).clamp(1.0 / LIMIT, LIMIT);
        }
        let mut err = 0.0;
        // Scaled rows carry scaled-down activations: the energies the rounding will weigh by.
        let scaled_energy: Vec<f32> = energy.iter().zip(&s).map(|(e, s)| (e / (s * s)) as f32).collect();
        for ((n, w), scheme) in sampled.iter().zip(&schemes) {
            let (Some(scheme), n) = (scheme, *n) else { continue };
            let scaled: Vec<f32> = w.iter().enumerate().map(|(i, v)| (v * s[i / n]) as f32).collect();
            let range = super::quantize::Range::Weighted(&scaled_energy);
            let q = super::quantize::quantize_rtn(&scaled, k, n, *scheme, range)?.dequantize();
            for j in 0..k {
                let row: f64 = (0..n)
                    .map(|c| {
                        let d = q[j * n + c] as f64 / s[j] - w[j * n + c];
                        d * d
                    })
                    .sum();
                err += energy[j] * row;
            }
        }
        if best.as_ref().is_none_or(|(e, _)| err < *e) {
            best = Some((err, s));
        }
    }
    Ok(best.expect("the grid is not empty").1)
}

/// `l` reading the weight its node reads now.
fn current(g: &Graph, l: &Linear) -> Linear {
    let mut l = l.clone();
    l.weight = g.inputs_of(l.node)[1].expect("a linear layer has a weight");
    l
}

/// Where `input`'s division can be folded exactly, if anywhere: only the layers `ls` may read it.
fn fold_for(g: &Graph, input: ValueRef, ls: &[Linear], layers: &[Linear]) -> Option<Fold> {
    // Readers of the shape alone do not mind the scaling.
    let reads_values = |u: &petgraph::stable_graph::NodeIndex| !matches!(g.g[*u].op, Op::Shape { .. });
    if g.outputs.iter().any(|o| o.value == input)
        || g.users_of(input).iter().any(|(u, _)| reads_values(u) && !ls.iter().any(|l| l.node == *u))
    {
        return None;
    }
    if ls.iter().any(|l| l.k != ls[0].k) || input.slot != 0 {
        return None;
    }
    let k = ls[0].k;
    let per_channel_const = |v: Option<ValueRef>| {
        v.and_then(|v| g.const_of(v)).is_some_and(|c| c.shape == [k] && c.dtype == crate::ir::DType::F32)
    };
    let node = input.node;
    let ins = g.inputs_of(node);
    match &g.g[node].op {
        Op::RmsNorm { axis, .. } | Op::LayerNorm { axis, .. } => {
            let rank = g.ty(input).shape.as_ref()?.len() as i64;
            // Normalised over the last axis only: then the scale is per channel.
            let last = *axis == -1 || *axis == rank - 1;
            let bias_ok = ins.get(2).copied().flatten().is_none_or(|b| per_channel_const(Some(b)));
            (last && per_channel_const(ins.get(1).copied().flatten()) && bias_ok).then_some(Fold::Norm { node })
        }
        Op::Binary(BinaryOp::Mul) => {
            // One factor is a linear layer's output [.., k] read only here; the other has the same shape.
            let shape = g.ty(input).shape.clone()?;
            ins.iter().flatten().find_map(|v| {
                let up = layers.iter().find(|l| l.node == v.node && v.slot == 0 && l.n == k)?;
                let only_here = g.users_of(*v).len() == 1 && !g.outputs.iter().any(|o| o.value == *v);
                let same = g.ty(*v).shape.as_ref() == Some(&shape);
                // A Gemm's bias would need the division too: left alone.
                let no_bias = g.inputs_of(up.node).get(2).copied().flatten().is_none();
                (only_here && same && no_bias && !ls.iter().any(|l| l.node == up.node))
                    .then(|| Fold::Columns(up.clone()))
            })
        }
        _ => None,
    }
}

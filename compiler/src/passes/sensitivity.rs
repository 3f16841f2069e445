//! Per-layer quantization sensitivity (`edgec compile --quantize S --auto-keep N --calibrate FILE`):
//! every linear layer the quantize pass would round with its main scheme is rounded once
//! (round-to-nearest) and ranked by the relative output error that causes on the calibration
//! activations, `‖X·ΔW‖² / ‖X·W‖² = tr(ΔWᵀ H ΔW) / tr(Wᵀ H W)` with `H = XᵀX` from `calib`. The top
//! `N` (or, in rank order, those that fit a byte budget) become exact-name rules at a higher
//! precision. Relative (not absolute) error, so a layer's rank does not depend on the scale of its
//! activations; no model runs beyond the calibration pass the Gram matrices come from.
//! Round-to-nearest even under `--method gptq`: GPTQ's error on the calibration rows is in-sample
//! (it is fitted to them), and ranking by it chose worse layers on SmolLM2 (README) at twice the
//! rounding time.

use super::prune::rel_error;
use super::quantize::{quantize_rtn, Quantize, Rule, Scheme};
use crate::calib::{linear_layers, Calibration};
use crate::error::Result;
use crate::ir::Graph;

/// One layer's entry in the ranking.
#[derive(Clone, Debug, PartialEq)]
pub struct Sensitivity {
    /// The MatMul's node name (what the rules of `--auto-keep` match).
    pub name: String,
    /// The weight constant's name.
    pub weight: String,
    pub k: usize,
    pub n: usize,
    /// `‖X·ΔW‖² / ‖X·W‖²` of the main scheme's rounding.
    pub rel_error: f64,
    /// Bytes of the weight in the main scheme.
    pub bytes: usize,
}

/// The layers `pass` would quantize with its main scheme, most sensitive first. Layers whose input
/// did not run during calibration, or that a rule already places, are not ranked.
pub fn scan(g: &Graph, cal: &Calibration, pass: &Quantize) -> Result<Vec<Sensitivity>> {
    let scheme = pass.scheme;
    let mut todo = Vec::new();
    for l in linear_layers(g) {
        let node = g.node(l.node);
        let Some(c) = g.const_of(l.weight) else { continue };
        if pass.layer_scheme(g, &l) != Some(scheme) {
            continue;
        }
        if let Some(h) = cal.gram_for(g, l.node) {
            todo.push((l, node.name.clone(), c, h));
        }
    }
    // Layers are independent: spread them over the CPUs (the error estimate is K² per column).
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(todo.len()).max(1);
    let todo = &todo;
    let mut out: Vec<Sensitivity> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || -> Result<Vec<Sensitivity>> {
                    let mut mine = Vec::new();
                    for (l, name, c, h) in todo.iter().skip(t).step_by(threads) {
                        let w = c.to_tensor().to_f64_vec();
                        let w32: Vec<f32> = w.iter().map(|&v| v as f32).collect();
                        let q = quantize_rtn(&w32, l.k, l.n, scheme, pass.range(name))?;
                        let dq: Vec<f64> = q.dequantize().into_iter().map(f64::from).collect();
                        mine.push(Sensitivity {
                            name: name.clone(),
                            weight: c.name.clone(),
                            k: l.k,
                            n: l.n,
                            rel_error: rel_error(h, &w, &dq, l.n),
                            bytes: scheme.weight_bytes(l.k, l.n)?,
                        });
                    }
                    Ok(mine)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("sensitivity worker")).collect::<Result<Vec<_>>>()
    })?
    .into_iter()
    .flatten()
    .collect();
    out.sort_by(|a, b| b.rel_error.total_cmp(&a.rel_error).then_with(|| a.name.cmp(&b.name)));
    Ok(out)
}

/// How much `--auto-keep` may keep: a number of layers, or extra bytes over the main scheme.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    Layers(usize),
    Bytes(usize),
}

impl std::str::FromStr for Budget {
    type Err = String;
    /// `N` layers, or `NKB` / `NMB` / `NGB` (decimal units) extra bytes.
    fn from_str(s: &str) -> std::result::Result<Budget, String> {
        let bad = || format!("'{s}': expected a number of layers (N) or extra bytes (e.g. 2MB)");
        for (suffix, unit) in [("KB", 1e3), ("MB", 1e6), ("GB", 1e9)] {
            if let Some(v) = s.strip_suffix(suffix) {
                let v: f64 = v.parse().map_err(|_| bad())?;
                return if v >= 0.0 { Ok(Budget::Bytes((v * unit) as usize)) } else { Err(bad()) };
            }
        }
        s.parse().map(Budget::Layers).map_err(|_| bad())
    }
}

/// Which layers of `ranking` to keep at `keep` (`None`: f32): the first N, or, in rank order, every
/// layer whose extra bytes still fit the budget.
pub fn choose(ranking: &[Sensitivity], budget: Budget, keep: Option<Scheme>) -> Result<Vec<bool>> {
    let mut left = match budget {
        Budget::Layers(n) => return Ok((0..ranking.len()).map(|i| i < n).collect()),
        Budget::Bytes(b) => b,
    };
    let mut chosen = Vec::with_capacity(ranking.len());
    for s in ranking {
        let kept = keep.map_or(Ok(4 * s.k * s.n), |k| k.weight_bytes(s.k, s.n))?;
        let extra = kept.saturating_sub(s.bytes);
        chosen.push(extra <= left);
        if extra <= left {
            left -= extra;
        }
    }
    Ok(chosen)
}

/// Exact-name rules that give the chosen layers the precision `keep`.
pub fn keep_rules(ranking: &[Sensitivity], chosen: &[bool], keep: Option<Scheme>) -> Vec<Rule> {
    ranking
        .iter()
        .zip(chosen)
        .filter(|(_, &c)| c)
        .map(|(s, _)| Rule { pattern: s.name.clone(), exact: true, precision: keep })
        .collect()
}

/// The ranking as a row of `edgec compile --report`.
pub fn to_json(ranking: &[Sensitivity], chosen: &[bool], scheme: Scheme, keep: Option<Scheme>, ms: f64) -> String {
    let keep_text = keep.map_or("fp32".to_string(), |s| s.to_string());
    let layers: Vec<String> = ranking
        .iter()
        .zip(chosen)
        .enumerate()
        .map(|(i, (s, kept))| {
            format!(
                r#"{{"rank":{},"name":{:?},"weight":{:?},"k":{},"n":{},"rel_error":{:.6e},"bytes":{},"kept":{kept}}}"#,
                i + 1,
                s.name,
                s.weight,
                s.k,
                s.n,
                s.rel_error,
                s.bytes,
            )
        })
        .collect();
    format!(
        r#"{{"pass":"sensitivity","scheme":"{scheme}","keep":"{keep_text}","kept":{},"ms":{ms:.1},"layers":[{}]}}"#,
        chosen.iter().filter(|&&c| c).count(),
        layers.join(",")
    )
}

//! Per-layer quantization sensitivity (`edgec compile --quantize S --auto-keep N --calibrate FILE`):
//! every linear layer the quantize pass would round with its main scheme is rounded once
//! (round-to-nearest), and ranked by the relative output error that causes on the calibration
//! activations, `‖X·ΔW‖² / ‖X·W‖² = tr(ΔWᵀ H ΔW) / tr(Wᵀ H W)` with `H = XᵀX` from `calib`.
//! The top `N` become exact-name rules at a higher precision. Relative (not absolute) error, so a
//! layer's rank does not depend on the scale of its activations; one rounding per layer, no model
//! runs beyond the calibration pass the Gram matrices come from.

use super::prune::rel_error;
use super::quantize::{quantize_rtn, Quantize, Rule, Scheme};
use crate::calib::{linear_layers, Calibration};
use crate::error::Result;
use crate::ir::{Graph, Op};

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
    let (scheme, search) = (pass.scheme, pass.search);
    let mut todo = Vec::new();
    for l in linear_layers(g) {
        let node = g.node(l.node);
        let Some(c) = g.const_of(l.weight) else { continue };
        if node.op != Op::MatMul || l.transposed || pass.precision(&[&node.name, &c.name]) != Some(scheme) {
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
                        let dq: Vec<f64> = quantize_rtn(&w32, l.k, l.n, scheme, search)?
                            .dequantize()
                            .into_iter()
                            .map(f64::from)
                            .collect();
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

/// Rules that give the first `n` layers of `ranking` the precision `keep` (`None`: f32).
pub fn keep_rules(ranking: &[Sensitivity], n: usize, keep: Option<Scheme>) -> Vec<Rule> {
    ranking.iter().take(n).map(|s| Rule { pattern: s.name.clone(), exact: true, precision: keep }).collect()
}

/// The ranking as a row of `edgec compile --report`.
pub fn to_json(ranking: &[Sensitivity], scheme: Scheme, kept: usize, keep: Option<Scheme>, ms: f64) -> String {
    let keep_text = keep.map_or("fp32".to_string(), |s| s.to_string());
    let layers: Vec<String> = ranking
        .iter()
        .enumerate()
        .map(|(i, s)| {
            format!(
                r#"{{"rank":{},"name":{:?},"weight":{:?},"k":{},"n":{},"rel_error":{:.6e},"bytes":{},"kept":{}}}"#,
                i + 1,
                s.name,
                s.weight,
                s.k,
                s.n,
                s.rel_error,
                s.bytes,
                i < kept
            )
        })
        .collect();
    format!(
        r#"{{"pass":"sensitivity","scheme":"{scheme}","keep":"{keep_text}","kept":{},"ms":{ms:.1},"layers":[{}]}}"#,
        kept.min(ranking.len()),
        layers.join(",")
    )
}

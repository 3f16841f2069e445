//! GPTQ-style weight rounding (`--quantize int4 --method gptq`): layer by layer, round the weights
//! of each output column one input row at a time and spread each rounding error over the rows not
//! rounded yet, in the proportions that minimise the layer's output error on calibration data,
//! `‖X·W − X·Q‖²` with `H = XᵀX` (Frantar et al., 2022). Columns are independent given `H`, so
//! they run on every core. The block parameters of a group are fitted when its first row is reached,
//! on the weights as already updated.

use super::quantize::{BlockParams, Quantized, Scheme};
use crate::calib::linalg::{damped, inverse_upper_factor};
use crate::error::{Error, Result};

/// How GPTQ rounds: `--method gptq[:damp=F][:act-order|:row-order]`. The defaults (damping 0.1,
/// act-order) are what measured best on SmolLM2-135M (README, "GPTQ"); `gptq:damp=0.01:row-order`
/// is the paper's plain variant.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GptqOptions {
    /// Relative damping added to H's diagonal (of its mean); the paper uses 0.01. Larger values pull
    /// the result toward round-to-nearest, which matters when H comes from fewer calibration rows
    /// than the layer has inputs (it is then singular and GPTQ over-fits those rows).
    pub damp: f64,
    /// Round the input rows in order of decreasing `H_ii` (largest activations first) instead of
    /// in storage order, so the rows that matter most are rounded while the most rows remain to
    /// absorb their error. Blocks stay contiguous groups of K: a block's parameters are fitted
    /// when the first of its rows is reached, on the weights as updated so far.
    pub act_order: bool,
}

impl Default for GptqOptions {
    fn default() -> Self {
        GptqOptions { damp: 0.1, act_order: true }
    }
}

impl std::str::FromStr for GptqOptions {
    type Err = String;
    /// The part after `gptq`: `""`, `":damp=0.01"`, `":row-order"`, `":damp=0.01:row-order"`.
    fn from_str(s: &str) -> std::result::Result<GptqOptions, String> {
        let mut o = GptqOptions::default();
        for part in s.split(':').filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some(("damp", v)) => {
                    o.damp = v.parse().ok().filter(|d: &f64| d.is_finite() && *d > 0.0).ok_or_else(|| {
                        format!("gptq damp={v}: expected a positive number (relative to mean(diag H))")
                    })?
                }
                None if part == "act-order" => o.act_order = true,
                None if part == "row-order" => o.act_order = false,
                _ => return Err(format!("gptq option '{part}': expected damp=F, act-order or row-order")),
            }
        }
        Ok(o)
    }
}

/// `w` row-major K x N, `h` the K x K Gram matrix of the layer's inputs.
pub fn gptq(w: &[f32], k: usize, n: usize, h: &[f64], scheme: Scheme, opt: GptqOptions) -> Result<Quantized> {
    if h.len() != k * k || w.len() != k * n {
        return Err(Error::Invalid(format!("gptq: H is {} values and W {} for K={k} N={n}", h.len(), w.len())));
    }
    // perm[i]: the input row rounded i-th.
    let mut perm: Vec<usize> = (0..k).collect();
    if opt.act_order {
        perm.sort_by(|&a, &b| h[b * k + b].total_cmp(&h[a * k + a]));
    }
    let mut pos = vec![0; k];
    for (i, &r) in perm.iter().enumerate() {
        pos[r] = i;
    }
    let hp: Vec<f64> = (0..k * k).map(|ij| h[perm[ij / k] * k + perm[ij % k]]).collect();
    let a = damped(&hp, k, opt.damp);
    // Hinv = Uᵀ·U (in rounding order): row i of U spreads the error of row i over rows i+1.. (divided by U_ii).
    let u = inverse_upper_factor(&a, k).map_err(|e| Error::Invalid(format!("gptq: {e}")))?;
    let mut out = Quantized::new(k, n, scheme)?;
    let bs = out.layout.block_size;
    let column = |c: usize| -> Vec<(BlockParams, Vec<u8>)> {
        // In rounding order.
        let mut col: Vec<f64> = perm.iter().map(|&kk| w[kk * n + c] as f64).collect();
        let mut params: Vec<Option<BlockParams>> = vec![None; k.div_ceil(bs)];
        let mut q = vec![0u8; k];
        for i in 0..k {
            let row = perm[i];
            let blk = row / bs;
            let p = *params[blk].get_or_insert_with(|| {
                // The block's rows as updated so far.
                let vals: Vec<f32> = (blk * bs..((blk + 1) * bs).min(k)).map(|r| col[pos[r]] as f32).collect();
                BlockParams::fit(&vals, scheme.bits, scheme.asym)
            });
            let qi = p.quantize(col[i] as f32);
            let err = (col[i] - p.dequantize(qi) as f64) / u[i * k + i];
            for j in i + 1..k {
                col[j] -= err * u[i * k + j];
            }
            q[row] = qi;
        }
        params
            .into_iter()
            .enumerate()
            .map(|(b, p)| (p.expect("every block has rows"), q[b * bs..((b + 1) * bs).min(k)].to_vec()))
            .collect()
    };
    out.fill_columns(column);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::passes::quantize::{quantize_rtn, Range};

    #[test]
    fn options_parse() {
        let p = |s: &str| s.parse::<GptqOptions>();
        assert_eq!(p(""), Ok(GptqOptions { damp: 0.1, act_order: true }));
        assert_eq!(p(":damp=0.01:row-order"), Ok(GptqOptions { damp: 0.01, act_order: false }));
        assert_eq!(p(":row-order:act-order"), Ok(GptqOptions { damp: 0.1, act_order: true }));
        assert!(p(":damp=0").unwrap_err().contains("positive"));
        assert!(p(":damp=x").unwrap_err().contains("damp=x"));
        assert!(p(":fast").unwrap_err().contains("'fast'"));
    }

    /// Output errors `‖X·W − X·Q‖²` of RTN and of GPTQ with each option set, on inputs with a
    /// shared component (channels correlate as real activations do) whose channels in `loud` are
    /// scaled by 20 (the outlier channels of LLM activations).
    fn output_errors(loud: std::ops::Range<usize>, opts: &[GptqOptions]) -> (f64, Vec<f64>) {
        let (k, n, rows) = (64, 24, 256);
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        let mut rnd = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let x: Vec<f32> = (0..rows)
            .flat_map(|_| {
                let common = rnd() * 3.0;
                let v: Vec<f32> = (0..k).map(|i| common * (i % 5) as f32 * 0.3 + rnd()).collect();
                v.into_iter().enumerate().map(|(i, v)| if loud.contains(&i) { v * 20.0 } else { v }).collect::<Vec<_>>()
            })
            .collect();
        let w: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
        let mut h = vec![0f64; k * k];
        for r in 0..rows {
            for i in 0..k {
                for j in 0..k {
                    h[i * k + j] += x[r * k + i] as f64 * x[r * k + j] as f64;
                }
            }
        }
        let scheme: Scheme = "int4:g16".parse().unwrap();
        let out_err = |q: &Quantized| -> f64 {
            let l = q.layout;
            let mut e = 0.0;
            for r in 0..rows {
                for c in 0..n {
                    let mut d = 0.0;
                    for kk in 0..k {
                        let blk = kk / l.block_size;
                        let z = l.zero(q.zero_points.as_deref(), blk, c) as i32;
                        let wq = (l.q(&q.b, kk, c) as i32 - z) as f32 * q.scales[c * l.blocks() + blk];
                        d += (x[r * k + kk] * (w[kk * n + c] - wq)) as f64;
                    }
                    e += d * d;
                }
            }
            e
        };
        let rtn = out_err(&quantize_rtn(&w, k, n, scheme, Range::Full).unwrap());
        (rtn, opts.iter().map(|&o| out_err(&gptq(&w, k, n, &h, scheme, o).unwrap())).collect())
    }

    /// On correlated inputs GPTQ's output error is below round-to-nearest's for the same scheme.
    #[test]
    fn gptq_beats_round_to_nearest_on_the_output() {
        let opts = [GptqOptions::default(), ":damp=0.01:row-order".parse().unwrap()];
        let (rtn, g) = output_errors(0..0, &opts);
        for (o, g) in opts.iter().zip(g) {
            assert!(g < 0.8 * rtn, "gptq {o:?}: {g} vs rtn {rtn}");
        }
    }

    /// With loud channels among the last rows, storage order rounds them when no rows are left to
    /// absorb their error; act-order rounds them first.
    #[test]
    fn act_order_helps_with_outlier_channels() {
        let opts: Vec<GptqOptions> = [":row-order", ":act-order"].iter().map(|s| s.parse().unwrap()).collect();
        let (rtn, g) = output_errors(56..64, &opts);
        assert!(g[1] < 0.8 * g[0] && g[0] < rtn, "act-order {} vs row order {} (rtn {rtn})", g[1], g[0]);
    }
}

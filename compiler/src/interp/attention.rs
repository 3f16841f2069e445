//! Fused scaled dot-product attention (`Op::Attention`), computed in f64 per query row: the
//! reference the fused native kernel and the unfused op chain are compared against.

use super::broadcast::broadcast_index;
use crate::ir::{Data, Tensor};

fn dims4(t: &Tensor, what: &str) -> Result<[usize; 4], String> {
    if !t.dtype().is_float() {
        return Err(format!("{what} must be a float tensor, got {}", t.dtype()));
    }
    <[usize; 4]>::try_from(t.shape.as_slice()).map_err(|_| format!("{what} must have rank 4, got {:?}", t.shape))
}

/// `softmax(q @ k^T * scale + mask) @ v` with query head h reading kv head h / (hq / hkv).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f32) -> Result<Tensor, String> {
    let [b, hq, s, d] = dims4(q, "q")?;
    let [kb, hkv, t, kd] = dims4(k, "k")?;
    let [vb, vh, vt, dv] = dims4(v, "v")?;
    if kb != b || vb != b || vh != hkv || vt != t || kd != d {
        return Err(format!("q {:?}, k {:?}, v {:?} do not fit together", q.shape, k.shape, v.shape));
    }
    if hkv == 0 || hq % hkv != 0 {
        return Err(format!("{hq} query heads are not a multiple of {hkv} kv heads"));
    }
    let group = hq / hkv;
    let full = [b, hq, s, t];
    let m: Option<(Vec<f64>, Vec<usize>)> = match mask {
        Some(m) => {
            let ok = m.rank() <= 4 && m.shape.iter().rev().zip(full.iter().rev()).all(|(&a, &f)| a == 1 || a == f);
            if !ok || !m.dtype().is_float() {
                return Err(format!("mask {} {:?} does not broadcast to {full:?}", m.dtype(), m.shape));
            }
            super::broadcast::check_size(&full)?;
            Some((m.to_f64_vec(), broadcast_index(&m.shape, &full)))
        }
        None => None,
    };
    let (qv, kv, vv) = (q.to_f64_vec(), k.to_f64_vec(), v.to_f64_vec());
    let mut out = vec![0.0; b * hq * s * dv];
    let mut scores = vec![0.0; t];
    for bi in 0..b {
        for h in 0..hq {
            let kh = h / group;
            let kbase = (bi * hkv + kh) * t;
            for i in 0..s {
                let qrow = &qv[((bi * hq + h) * s + i) * d..][..d];
                for (j, sc) in scores.iter_mut().enumerate() {
                    let krow = &kv[(kbase + j) * d..][..d];
                    let dot: f64 = qrow.iter().zip(krow).map(|(a, b)| a * b).sum();
                    *sc = dot * scale as f64;
                    if let Some((mv, idx)) = &m {
                        *sc += mv[idx[((bi * hq + h) * s + i) * t + j]];
                    }
                }
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let mut sum = 0.0;
                for sc in scores.iter_mut() {
                    *sc = (*sc - max).exp();
                    sum += *sc;
                }
                let orow = &mut out[((bi * hq + h) * s + i) * dv..][..dv];
                for (j, p) in scores.iter().enumerate() {
                    let vrow = &vv[(kbase + j) * dv..][..dv];
                    for (o, x) in orow.iter_mut().zip(vrow) {
                        *o += p / sum * x;
                    }
                }
            }
        }
    }
    let shape = vec![b, hq, s, dv];
    Ok(match q.data {
        Data::F64(_) => Tensor::from_vec(shape, out),
        _ => Tensor::from_vec(shape, out.into_iter().map(|x| x as f32).collect()),
    })
}

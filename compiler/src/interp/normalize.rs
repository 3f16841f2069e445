//! Softmax, LogSoftmax and LayerNormalization: reductions along trailing axes
//! computed in f64 and rounded once.

use crate::ir::{Data, Tensor};

pub fn norm_axis(axis: i64, rank: usize) -> Result<usize, String> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r.max(1) {
        return Err(format!("axis {axis} is out of range for rank {rank}"));
    }
    Ok(a as usize)
}

fn float_vec(t: &Tensor) -> Result<Vec<f64>, String> {
    if !t.dtype().is_float() {
        return Err(format!("needs a float tensor, got {}", t.dtype()));
    }
    Ok(t.to_f64_vec())
}

fn like(t: &Tensor, shape: Vec<usize>, v: Vec<f64>) -> Tensor {
    match t.data {
        Data::F64(_) => Tensor::from_vec(shape, v),
        _ => Tensor::from_vec(shape, v.into_iter().map(|x| x as f32).collect()),
    }
}

/// Softmax (or log-softmax) along one axis (opset 13 semantics).
pub fn softmax(x: &Tensor, axis: i64, log: bool) -> Result<Tensor, String> {
    let v = float_vec(x)?;
    if x.rank() == 0 {
        return Ok(like(x, vec![], vec![if log { 0.0 } else { 1.0 }]));
    }
    let ax = norm_axis(axis, x.rank())?;
    let len = x.shape[ax];
    let inner: usize = x.shape[ax + 1..].iter().product();
    let outer: usize = x.shape[..ax].iter().product();
    let mut out = vec![0.0; v.len()];
    for o in 0..outer {
        for i in 0..inner {
            let at = |j: usize| o * len * inner + j * inner + i;
            let max = (0..len).map(|j| v[at(j)]).fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = (0..len).map(|j| (v[at(j)] - max).exp()).sum();
            for j in 0..len {
                let e = v[at(j)] - max;
                out[at(j)] = if log { e - sum.ln() } else { e.exp() / sum };
            }
        }
    }
    Ok(like(x, x.shape.clone(), out))
}

/// LayerNormalization over axes `axis..rank`; also returns mean and 1/stddev
/// (shape: leading dims, then 1s) for the optional outputs.
pub fn layer_norm(
    x: &Tensor,
    scale: &Tensor,
    bias: Option<&Tensor>,
    axis: i64,
    eps: f32,
) -> Result<Vec<Tensor>, String> {
    let v = float_vec(x)?;
    let ax = norm_axis(axis, x.rank())?;
    let size: usize = x.shape[ax..].iter().product();
    let outer: usize = x.shape[..ax].iter().product();
    let norm_shape = &x.shape[ax..];
    let bcast = |t: &Tensor, what: &str| -> Result<Vec<f64>, String> {
        let w = float_vec(t)?;
        if w.len() == size {
            return Ok(w);
        }
        // Scale/bias broadcast to the normalized shape.
        if t.rank() <= norm_shape.len() {
            let idx = super::broadcast::broadcast_index(&t.shape, norm_shape);
            if super::broadcast::broadcast_shapes(&[&t.shape, norm_shape]).ok().as_deref() == Some(norm_shape) {
                return Ok(idx.into_iter().map(|i| w[i]).collect());
            }
        }
        Err(format!("{what} {:?} does not broadcast to the normalized shape {norm_shape:?}", t.shape))
    };
    let s = bcast(scale, "scale")?;
    let b = match bias {
        Some(b) => bcast(b, "bias")?,
        None => vec![0.0; size],
    };
    let mut out = vec![0.0; v.len()];
    let mut means = Vec::with_capacity(outer);
    let mut inv_stds = Vec::with_capacity(outer);
    for o in 0..outer {
        let row = &v[o * size..(o + 1) * size];
        let mean = row.iter().sum::<f64>() / size as f64;
        let var = row.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / size as f64;
        let inv = 1.0 / (var + eps as f64).sqrt();
        for j in 0..size {
            out[o * size + j] = (row[j] - mean) * inv * s[j] + b[j];
        }
        means.push(mean);
        inv_stds.push(inv);
    }
    let mut stat_shape = x.shape[..ax].to_vec();
    stat_shape.extend(std::iter::repeat_n(1, x.rank() - ax));
    Ok(vec![
        like(x, x.shape.clone(), out),
        Tensor::from_vec(stat_shape.clone(), means.into_iter().map(|m| m as f32).collect()),
        Tensor::from_vec(stat_shape, inv_stds.into_iter().map(|m| m as f32).collect()),
    ])
}

/// RMSNormalization (opset 23) over axes `axis..rank`: `x / sqrt(mean(x^2) + eps) * scale`, the
/// statistics in f64; `scale` broadcasts to the normalized shape.
pub fn rms_norm(x: &Tensor, scale: &Tensor, axis: i64, eps: f32) -> Result<Tensor, String> {
    let v = float_vec(x)?;
    let ax = norm_axis(axis, x.rank())?;
    let size: usize = x.shape[ax..].iter().product();
    let outer: usize = x.shape[..ax].iter().product();
    let norm_shape = &x.shape[ax..];
    let w = float_vec(scale)?;
    let s: Vec<f64> = if w.len() == size {
        w
    } else if scale.rank() <= norm_shape.len()
        && super::broadcast::broadcast_shapes(&[&scale.shape, norm_shape]).ok().as_deref() == Some(norm_shape)
    {
        super::broadcast::broadcast_index(&scale.shape, norm_shape).into_iter().map(|i| w[i]).collect()
    } else {
        return Err(format!("scale {:?} does not broadcast to the normalized shape {norm_shape:?}", scale.shape));
    };
    let mut out = vec![0.0; v.len()];
    for o in 0..outer {
        let row = &v[o * size..(o + 1) * size];
        let ms = row.iter().map(|x| x * x).sum::<f64>() / size.max(1) as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        for j in 0..size {
            out[o * size + j] = row[j] * inv * s[j];
        }
    }
    Ok(like(x, x.shape.clone(), out))
}

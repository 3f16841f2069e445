//! QuantizeLinear, DequantizeLinear (per-tensor, per-axis, blocked) and
//! DynamicQuantizeLinear.

use super::math::round_half_even;
use super::normalize::norm_axis;
use crate::ir::{DType, Data, Tensor};

/// For each element of `x`, the index of its scale: one scale, one per slice along
/// `axis`, or one per `block` consecutive elements along `axis`.
fn scale_index(x: &[usize], scale: &Tensor, axis: i64, block: i64) -> Result<Vec<usize>, String> {
    let n: usize = x.iter().product();
    if scale.len() == 1 && block == 0 {
        return Ok(vec![0; n]);
    }
    let ax = norm_axis(axis, x.len())?;
    let inner: usize = x[ax + 1..].iter().product();
    let dim = x[ax];
    if block == 0 {
        if scale.rank() != 1 || scale.len() != dim {
            return Err(format!("per-axis scale of shape {:?} does not match axis {ax} of {x:?}", scale.shape));
        }
        return Ok((0..n).map(|i| (i / inner) % dim).collect());
    }
    // Blocked: scale has x's shape with axis `ax` divided into ceil(dim/block).
    let b = block as usize;
    let mut want = x.to_vec();
    want[ax] = dim.div_ceil(b);
    if scale.shape != want {
        return Err(format!("blocked scale of shape {:?} does not match {want:?}", scale.shape));
    }
    let ss = crate::ir::tensor::strides(&want);
    let xs = crate::ir::tensor::strides(x);
    Ok((0..n).map(|i| (0..x.len()).map(|a| ((i / xs[a]) % x[a] / if a == ax { b } else { 1 }) * ss[a]).sum()).collect())
}

fn zero_points(zp: Option<&Tensor>, n: usize) -> Result<Vec<i64>, String> {
    match zp {
        Some(z) => z.to_i64_vec(),
        None => Ok(vec![0; n.max(1)]),
    }
}

pub fn quantize_linear(
    x: &Tensor,
    scale: &Tensor,
    zp: Option<&Tensor>,
    axis: i64,
    block: i64,
    output_dtype: Option<DType>,
) -> Result<Tensor, String> {
    let out = match (output_dtype, zp) {
        (Some(d), Some(z)) if d != z.dtype() => return Err("output_dtype differs from the zero point's type".into()),
        (Some(d), _) => d,
        (None, Some(z)) => z.dtype(),
        (None, None) => DType::U8,
    };
    let (lo, hi) = match out {
        DType::U8 => (0.0, 255.0),
        DType::I8 => (-128.0, 127.0),
        d => return Err(format!("quantizing to {d} is not supported")),
    };
    let si = scale_index(&x.shape, scale, axis, block)?;
    let s = scale.to_f64_vec();
    let z = zero_points(zp, s.len())?;
    if z.len() != s.len() {
        return Err("scale and zero point have different sizes".into());
    }
    let xv = x.to_f64_vec();
    // Saturating round-half-to-even of x / scale + zero_point, computed in f32 like the spec.
    let q: Vec<f64> = xv
        .iter()
        .zip(&si)
        .map(|(&v, &i)| {
            let scaled = (v as f32 / s[i] as f32) as f64;
            (round_half_even(scaled) + z[i] as f64).clamp(lo, hi)
        })
        .collect();
    Ok(Tensor::from_vec(x.shape.clone(), q).cast(out))
}

pub fn dequantize_linear(
    x: &Tensor,
    scale: &Tensor,
    zp: Option<&Tensor>,
    axis: i64,
    block: i64,
) -> Result<Tensor, String> {
    if let Some(z) = zp {
        if z.dtype() != x.dtype() {
            return Err("the zero point must have the input's type".into());
        }
    }
    if !matches!(x.dtype(), DType::I8 | DType::U8 | DType::I32) {
        return Err(format!("dequantizing {} is not supported", x.dtype()));
    }
    let si = scale_index(&x.shape, scale, axis, block)?;
    let s = scale.to_f64_vec();
    let z = zero_points(zp, s.len())?;
    if z.len() != s.len() {
        return Err("scale and zero point have different sizes".into());
    }
    let xv = x.to_i64_vec()?;
    let v: Vec<f32> = xv.iter().zip(&si).map(|(&q, &i)| ((q - z[i]) as f32) * s[i] as f32).collect();
    let out = Tensor::from_vec(x.shape.clone(), v);
    Ok(match scale.data {
        Data::F64(_) => out.cast(DType::F64),
        _ => out,
    })
}

/// uint8 quantization with a scale and zero point from the tensor's range (which
/// always includes 0), as the ONNX spec defines it.
pub fn dynamic_quantize_linear(x: &Tensor) -> Result<Vec<Tensor>, String> {
    let v = x.as_slice::<f32>()?;
    let min = v.iter().cloned().fold(0.0f32, f32::min);
    let max = v.iter().cloned().fold(0.0f32, f32::max);
    let scale = (max - min) / 255.0;
    let zp = if scale == 0.0 { 0.0 } else { round_half_even((0.0 - min as f64 / scale as f64).clamp(0.0, 255.0)) };
    let q: Vec<u8> = v
        .iter()
        .map(|&e| {
            let s = if scale == 0.0 { 0.0 } else { (e / scale) as f64 };
            (round_half_even(s) + zp).clamp(0.0, 255.0) as u8
        })
        .collect();
    Ok(vec![Tensor::from_vec(x.shape.clone(), q), Tensor::scalar(scale), Tensor::scalar(zp as u8)])
}

/// The K x N weight (row-major) of a MatMulNBits node: (q - zero) * scale per block.
pub fn dequantize_nbits(
    b: &Tensor,
    scales: &Tensor,
    zp: Option<&Tensor>,
    k: usize,
    n: usize,
    bits: usize,
    block_size: usize,
) -> Result<Vec<f32>, String> {
    let l = crate::ir::nbits::NBitsLayout::new(k, n, bits, block_size)?;
    let q = b.as_slice::<u8>()?;
    let s = scales.as_slice::<f32>()?;
    let z = zp.map(|z| z.as_slice::<u8>()).transpose()?;
    l.check(q.len(), s.len(), z.map(|z| z.len()))?;
    let mut w = vec![0f32; k * n];
    for col in 0..n {
        for kk in 0..k {
            let blk = kk / block_size;
            let v = l.q(q, kk, col) as i32 - l.zero(z, blk, col) as i32;
            w[kk * n + col] = v as f32 * s[col * l.blocks() + blk];
        }
    }
    Ok(w)
}

/// A with each row's blocks of `block` values rounded to int8 and back: scale = max |x| / 127,
/// q = round_half_even(x * (127 / max |x|)) (what MatMulNBits accuracy_level 4 computes with).
pub fn round_rows_to_int8(a: &Tensor, block: usize) -> Result<Tensor, String> {
    let x = a.as_slice::<f32>()?;
    let k = *a.shape.last().ok_or("MatMulNBits input A must have rank >= 1")?;
    let mut out = x.to_vec();
    for row in out.chunks_mut(k.max(1)) {
        for blk in row.chunks_mut(block) {
            let (scale, inv) = int8_scale(blk);
            for v in blk.iter_mut() {
                *v = (*v * inv).round_ties_even() * scale;
            }
        }
    }
    Ok(Tensor::from_vec(a.shape.clone(), out))
}

/// A through `DequantizeLinear(QuantizeLinear(A, scale, zero), scale, zero)` with the static
/// per-tensor parameters of a MatMulNBits (`ActQuant`): the ONNX ops themselves.
pub fn round_static(a: &Tensor, q: &crate::ir::nbits::ActQuant) -> Result<Tensor, String> {
    let s = Tensor::scalar(q.scale);
    let z = Tensor::scalar(q.zero as i64).cast(q.dtype);
    let x = quantize_linear(a, &s, Some(&z), 1, 0, None)?;
    dequantize_linear(&x, &s, Some(&z), 1, 0)
}

/// (scale, 1 / scale) of one block of activations; zero blocks get (0, 0).
pub fn int8_scale(block: &[f32]) -> (f32, f32) {
    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 {
        (0.0, 0.0)
    } else {
        (amax / 127.0, 127.0 / amax)
    }
}

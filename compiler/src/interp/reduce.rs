//! Reductions (ReduceMean/Sum/Max/Min/Prod/L2/SumSquare), ArgMax/ArgMin, CumSum.

use super::broadcast::broadcast_index;
use super::normalize::norm_axis;
use crate::ir::{DType, ReduceKind, Tensor};

/// Normalised, sorted, de-duplicated axes.
fn norm_axes(axes: &[i64], rank: usize) -> Result<Vec<usize>, String> {
    let mut v = axes.iter().map(|&a| norm_axis(a, rank)).collect::<Result<Vec<_>, _>>()?;
    v.sort();
    v.dedup();
    Ok(v)
}

pub fn reduce(
    kind: ReduceKind,
    x: &Tensor,
    axes: Option<&[i64]>,
    keepdims: bool,
    noop_with_empty_axes: bool,
) -> Result<Tensor, String> {
    let axes = match axes {
        Some(a) if !a.is_empty() => norm_axes(a, x.rank())?,
        _ if noop_with_empty_axes => return Ok(x.clone()),
        _ => (0..x.rank()).collect(),
    };
    let kept: Vec<usize> = x.shape.iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect();
    let out_n: usize = kept.iter().product();
    let count: usize = axes.iter().map(|&a| x.shape[a]).product();
    // Input element i accumulates into output element map[i].
    let map = broadcast_index(&kept, &x.shape);
    let out_shape = if keepdims {
        kept.clone()
    } else {
        x.shape.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, &d)| d).collect()
    };
    let dtype = x.dtype();
    let result: Tensor = if dtype.is_float() {
        let v = x.to_f64_vec();
        let (init, step): (f64, fn(f64, f64) -> f64) = match kind {
            ReduceKind::Sum | ReduceKind::Mean => (0.0, |a, b| a + b),
            ReduceKind::SumSquare | ReduceKind::L2 => (0.0, |a, b| a + b * b),
            ReduceKind::Prod => (1.0, |a, b| a * b),
            ReduceKind::Max => (f64::NEG_INFINITY, |a, b| if b > a || b.is_nan() { b } else { a }),
            ReduceKind::Min => (f64::INFINITY, |a, b| if b < a || b.is_nan() { b } else { a }),
        };
        let mut acc = vec![init; out_n];
        for (i, &val) in v.iter().enumerate() {
            acc[map[i]] = step(acc[map[i]], val);
        }
        match kind {
            ReduceKind::Mean => acc.iter_mut().for_each(|a| *a /= count as f64),
            ReduceKind::L2 => acc.iter_mut().for_each(|a| *a = a.sqrt()),
            _ => {}
        }
        Tensor::from_vec(out_shape.clone(), acc).cast(dtype)
    } else {
        let v = x.cast(DType::I64);
        let v = v.as_slice::<i64>()?;
        // An empty Max/Min yields the type's lowest/highest value.
        let (lowest, highest) = match dtype {
            DType::I8 => (i8::MIN as i64, i8::MAX as i64),
            DType::U8 => (0, u8::MAX as i64),
            DType::I32 => (i32::MIN as i64, i32::MAX as i64),
            DType::Bool => (0, 1),
            _ => (i64::MIN, i64::MAX),
        };
        let (init, step): (i64, fn(i64, i64) -> i64) = match kind {
            ReduceKind::Sum | ReduceKind::Mean => (0, |a, b| a.wrapping_add(b)),
            ReduceKind::SumSquare | ReduceKind::L2 => (0, |a, b| a.wrapping_add(b.wrapping_mul(b))),
            ReduceKind::Prod => (1, |a, b| a.wrapping_mul(b)),
            ReduceKind::Max => (lowest, |a, b| a.max(b)),
            ReduceKind::Min => (highest, |a, b| a.min(b)),
        };
        let mut acc = vec![init; out_n];
        for (i, &val) in v.iter().enumerate() {
            acc[map[i]] = step(acc[map[i]], val);
        }
        match kind {
            ReduceKind::Mean if count > 0 => acc.iter_mut().for_each(|a| *a /= count as i64),
            ReduceKind::L2 => acc.iter_mut().for_each(|a| *a = (*a as f64).sqrt() as i64),
            _ => {}
        }
        Tensor::from_vec(out_shape.clone(), acc).cast(dtype)
    };
    Ok(result)
}

pub fn arg_reduce(x: &Tensor, max: bool, axis: i64, keepdims: bool, select_last: bool) -> Result<Tensor, String> {
    let ax = norm_axis(axis, x.rank())?;
    let len = x.shape[ax];
    if len == 0 {
        return Err("ArgMax/ArgMin over an empty axis".into());
    }
    let inner: usize = x.shape[ax + 1..].iter().product();
    let outer: usize = x.shape[..ax].iter().product();
    let v = x.to_f64_vec();
    let mut out = Vec::with_capacity(outer * inner);
    for o in 0..outer {
        for i in 0..inner {
            let at = |j: usize| v[o * len * inner + j * inner + i];
            let mut best = 0;
            for j in 1..len {
                let better = if max { at(j) > at(best) } else { at(j) < at(best) };
                if better || (select_last && at(j) == at(best)) {
                    best = j;
                }
            }
            out.push(best as i64);
        }
    }
    let mut shape = x.shape.clone();
    if keepdims {
        shape[ax] = 1;
    } else {
        shape.remove(ax);
    }
    Ok(Tensor::from_vec(shape, out))
}

pub fn cumsum(x: &Tensor, axis: &Tensor, exclusive: bool, reverse: bool) -> Result<Tensor, String> {
    let a = axis.to_i64_vec()?;
    if a.len() != 1 {
        return Err("CumSum axis must be a scalar".into());
    }
    let ax = norm_axis(a[0], x.rank())?;
    let len = x.shape[ax];
    let inner: usize = x.shape[ax + 1..].iter().product();
    let outer: usize = x.shape[..ax].iter().product();
    let dtype = x.dtype();
    let work = if dtype.is_float() { x.cast(DType::F64) } else { x.cast(DType::I64) };
    macro_rules! scan {
        ($t:ty) => {{
            let v = work.as_slice::<$t>()?;
            let mut out = vec![<$t>::default(); v.len()];
            for o in 0..outer {
                for i in 0..inner {
                    let mut acc = <$t>::default();
                    for step in 0..len {
                        let j = if reverse { len - 1 - step } else { step };
                        let at = o * len * inner + j * inner + i;
                        if exclusive {
                            out[at] = acc;
                            acc += v[at];
                        } else {
                            acc += v[at];
                            out[at] = acc;
                        }
                    }
                }
            }
            Tensor::from_vec(x.shape.clone(), out).cast(dtype)
        }};
    }
    Ok(if dtype.is_float() { scan!(f64) } else { scan!(i64) })
}

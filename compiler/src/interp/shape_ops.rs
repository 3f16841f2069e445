//! Data movement: every op here computes, for each output element, which input
//! element it copies, then calls `Tensor::take`. Plain and easy to check.

use super::broadcast::{broadcast_index, broadcast_shapes, check_size, MAX_ELEMENTS};
use super::normalize::norm_axis;
use crate::ir::tensor::strides;
use crate::ir::{DType, Data, Tensor};

/// Flat input index for each output element of a strided view:
/// out[c0..cn] = in[offset + sum(ci * st[i])].
fn view_index(out_shape: &[usize], st: &[isize], offset: isize) -> Vec<usize> {
    let n: usize = out_shape.iter().product();
    let mut idx = Vec::with_capacity(n);
    let mut counter = vec![0usize; out_shape.len()];
    let mut cur = offset;
    for _ in 0..n {
        idx.push(cur as usize);
        for ax in (0..out_shape.len()).rev() {
            counter[ax] += 1;
            cur += st[ax];
            if counter[ax] < out_shape[ax] {
                break;
            }
            cur -= st[ax] * counter[ax] as isize;
            counter[ax] = 0;
        }
    }
    idx
}

pub fn transpose(x: &Tensor, perm: Option<&[i64]>) -> Result<Tensor, String> {
    let r = x.rank();
    let perm: Vec<usize> = match perm {
        Some(p) => p.iter().map(|&a| norm_axis(a, r)).collect::<Result<_, _>>()?,
        None => (0..r).rev().collect(),
    };
    let mut sorted = perm.clone();
    sorted.sort();
    if sorted != (0..r).collect::<Vec<_>>() {
        return Err(format!("perm {perm:?} is not a permutation of 0..{r}"));
    }
    let st = strides(&x.shape);
    let out_shape: Vec<usize> = perm.iter().map(|&p| x.shape[p]).collect();
    let out_st: Vec<isize> = perm.iter().map(|&p| st[p] as isize).collect();
    Ok(x.take(out_shape.clone(), &view_index(&out_shape, &out_st, 0)))
}

/// Resolves a Reshape target (0 = copy, -1 = infer) against the input shape.
pub fn reshape_target(input: &[usize], target: &[i64], allowzero: bool) -> Result<Vec<usize>, String> {
    let n: usize = input.iter().product();
    let mut out = Vec::with_capacity(target.len());
    let mut infer = None;
    for (i, &t) in target.iter().enumerate() {
        match t {
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1);
            }
            0 if !allowzero => out.push(
                *input.get(i).ok_or_else(|| format!("shape entry {i} is 0 but the input has rank {}", input.len()))?,
            ),
            t if t >= 0 => out.push(t as usize),
            _ => return Err(format!("invalid reshape target {target:?}")),
        }
    }
    if let Some(i) = infer {
        let rest: usize = out.iter().product();
        if rest == 0 || !n.is_multiple_of(rest) {
            return Err(format!("cannot reshape {input:?} to {target:?}"));
        }
        out[i] = n / rest;
    }
    if out.iter().product::<usize>() != n {
        return Err(format!("cannot reshape {input:?} ({n} elements) to {target:?}"));
    }
    Ok(out)
}

pub fn reshape(x: &Tensor, shape: &Tensor, allowzero: bool) -> Result<Tensor, String> {
    let target = reshape_target(&x.shape, &shape.to_i64_vec()?, allowzero)?;
    Ok(x.clone().reshaped(target))
}

pub fn flatten(x: &Tensor, axis: i64) -> Result<Tensor, String> {
    let r = x.rank() as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a > r {
        return Err(format!("axis {axis} is out of range for rank {r}"));
    }
    let a = a as usize;
    let outer = x.shape[..a].iter().product();
    let inner = x.shape[a..].iter().product();
    Ok(x.clone().reshaped(vec![outer, inner]))
}

pub fn squeeze(x: &Tensor, axes: Option<&Tensor>) -> Result<Tensor, String> {
    let axes: Vec<usize> = match axes {
        Some(a) => a.to_i64_vec()?.iter().map(|&a| norm_axis(a, x.rank())).collect::<Result<_, _>>()?,
        None => (0..x.rank()).filter(|&i| x.shape[i] == 1).collect(),
    };
    if let Some(&a) = axes.iter().find(|&&a| x.shape[a] != 1) {
        return Err(format!("cannot squeeze axis {a} of size {}", x.shape[a]));
    }
    let shape = x.shape.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, &d)| d).collect();
    Ok(x.clone().reshaped(shape))
}

pub fn unsqueeze(x: &Tensor, axes: &Tensor) -> Result<Tensor, String> {
    let axes = axes.to_i64_vec()?;
    let r = x.rank() + axes.len();
    let mut norm: Vec<usize> = axes.iter().map(|&a| norm_axis(a, r)).collect::<Result<_, _>>()?;
    norm.sort();
    if norm.windows(2).any(|w| w[0] == w[1]) {
        return Err(format!("repeated axes {axes:?}"));
    }
    let mut shape = Vec::with_capacity(r);
    let mut src = x.shape.iter();
    for i in 0..r {
        shape.push(if norm.contains(&i) { 1 } else { *src.next().unwrap() });
    }
    Ok(x.clone().reshaped(shape))
}

pub fn concat(xs: &[&Tensor], axis: i64) -> Result<Tensor, String> {
    let first = xs[0];
    let ax = norm_axis(axis, first.rank())?;
    let dtype = first.dtype();
    for x in xs {
        if x.dtype() != dtype {
            return Err(format!("Concat inputs have different types: {} and {}", dtype, x.dtype()));
        }
        let same = x.rank() == first.rank() && (0..x.rank()).all(|i| i == ax || x.shape[i] == first.shape[i]);
        if !same {
            return Err(format!("Concat inputs {:?} and {:?} differ outside axis {ax}", first.shape, x.shape));
        }
    }
    let outer: usize = first.shape[..ax].iter().product();
    let inner: usize = first.shape[ax + 1..].iter().product();
    let mut shape = first.shape.clone();
    shape[ax] = xs.iter().map(|x| x.shape[ax]).sum();
    check_size(&shape)?;
    macro_rules! cat {
        ($variant:ident) => {{
            let mut out = Vec::with_capacity(shape.iter().product());
            for o in 0..outer {
                for x in xs {
                    if let Data::$variant(v) = &x.data {
                        let chunk = x.shape[ax] * inner;
                        out.extend_from_slice(&v[o * chunk..(o + 1) * chunk]);
                    }
                }
            }
            Data::$variant(out)
        }};
    }
    let data = match dtype {
        DType::F32 => cat!(F32),
        DType::F64 => cat!(F64),
        DType::I8 => cat!(I8),
        DType::U8 => cat!(U8),
        DType::I32 => cat!(I32),
        DType::I64 => cat!(I64),
        DType::Bool => cat!(Bool),
    };
    Ok(Tensor { shape, data })
}

/// A strided sub-block: start and step per axis, output shape given.
fn sub_block(x: &Tensor, starts: &[usize], steps: &[isize], out_shape: Vec<usize>) -> Tensor {
    let st = strides(&x.shape);
    let offset: isize = starts.iter().zip(&st).map(|(&s, &t)| (s * t) as isize).sum();
    let out_st: Vec<isize> = steps.iter().zip(&st).map(|(&p, &t)| p * t as isize).collect();
    let idx = if out_shape.contains(&0) { vec![] } else { view_index(&out_shape, &out_st, offset) };
    x.take(out_shape, &idx)
}

pub fn split(x: &Tensor, axis: i64, sizes: Option<&Tensor>, n_out: usize) -> Result<Vec<Tensor>, String> {
    let ax = norm_axis(axis, x.rank())?;
    let dim = x.shape[ax];
    let sizes: Vec<usize> = match sizes {
        Some(s) => {
            let v = s.to_i64_vec()?;
            if v.iter().any(|&s| s < 0) || v.iter().sum::<i64>() != dim as i64 {
                return Err(format!("split sizes {v:?} do not add up to dimension {dim}"));
            }
            v.iter().map(|&s| s as usize).collect()
        }
        None => {
            // Equal parts; the last one smaller when the dimension does not divide (opset 18).
            let chunk = dim.div_ceil(n_out.max(1));
            (0..n_out).map(|i| chunk.min(dim.saturating_sub(i * chunk))).collect()
        }
    };
    if sizes.len() != n_out {
        return Err(format!("{} split sizes for {n_out} outputs", sizes.len()));
    }
    let mut outs = Vec::with_capacity(n_out);
    let mut start = 0;
    for s in sizes {
        let mut starts = vec![0; x.rank()];
        starts[ax] = start;
        let mut shape = x.shape.clone();
        shape[ax] = s;
        outs.push(sub_block(x, &starts, &vec![1; x.rank()], shape));
        start += s;
    }
    Ok(outs)
}

/// Clamped ONNX Slice bounds for one axis: (start, output length).
pub fn slice_axis(dim: i64, start: i64, end: i64, step: i64) -> (i64, i64) {
    let norm = |v: i64| if v < 0 { v.saturating_add(dim) } else { v };
    let (s, e) = (norm(start), norm(end));
    if step > 0 {
        let s = s.clamp(0, dim);
        let e = e.clamp(0, dim);
        (s, if e > s { (e - s + step - 1) / step } else { 0 })
    } else {
        let s = s.clamp(-1, dim - 1);
        let e = e.clamp(-1, dim - 1);
        (s, if s > e { (s - e + (-step) - 1) / (-step) } else { 0 })
    }
}

pub fn slice(
    x: &Tensor,
    starts: &Tensor,
    ends: &Tensor,
    axes: Option<&Tensor>,
    steps: Option<&Tensor>,
) -> Result<Tensor, String> {
    let starts = starts.to_i64_vec()?;
    let ends = ends.to_i64_vec()?;
    let axes: Vec<usize> = match axes {
        Some(a) => a.to_i64_vec()?.iter().map(|&a| norm_axis(a, x.rank())).collect::<Result<_, _>>()?,
        None => (0..starts.len()).collect(),
    };
    let steps = match steps {
        Some(s) => s.to_i64_vec()?,
        None => vec![1; starts.len()],
    };
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return Err("Slice starts, ends, axes and steps must have the same length".into());
    }
    let mut st = vec![0usize; x.rank()];
    let mut step_v = vec![1isize; x.rank()];
    let mut shape = x.shape.clone();
    for i in 0..axes.len() {
        let ax = axes[i];
        if steps[i] == 0 {
            return Err("Slice step cannot be 0".into());
        }
        let (s, len) = slice_axis(x.shape[ax] as i64, starts[i], ends[i], steps[i]);
        shape[ax] = len as usize;
        st[ax] = if len > 0 { s as usize } else { 0 };
        step_v[ax] = steps[i] as isize;
    }
    Ok(sub_block(x, &st, &step_v, shape))
}

pub fn expand(x: &Tensor, shape: &Tensor) -> Result<Tensor, String> {
    let target: Vec<usize> = shape
        .to_i64_vec()?
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("negative dimension {d} in Expand shape")))
        .collect::<Result<_, _>>()?;
    let out = broadcast_shapes(&[&x.shape, &target])?;
    Ok(x.take(out.clone(), &broadcast_index(&x.shape, &out)))
}

pub fn tile(x: &Tensor, repeats: &Tensor) -> Result<Tensor, String> {
    let reps = repeats.to_i64_vec()?;
    if reps.len() != x.rank() || reps.iter().any(|&r| r < 0) {
        return Err(format!("Tile repeats {reps:?} do not fit rank {}", x.rank()));
    }
    let shape: Vec<usize> = x.shape.iter().zip(&reps).map(|(&d, &r)| d.saturating_mul(r as usize)).collect();
    check_size(&shape)?;
    let st = strides(&x.shape);
    let n: usize = shape.iter().product();
    let ost = strides(&shape);
    let idx: Vec<usize> =
        (0..n).map(|i| (0..shape.len()).map(|a| ((i / ost[a]) % shape[a] % x.shape[a]) * st[a]).sum()).collect();
    Ok(x.take(shape, &idx))
}

/// Clamps Shape's start/end (opset 15) to the rank.
pub fn shape_range(rank: usize, start: i64, end: Option<i64>) -> (usize, usize) {
    let r = rank as i64;
    let norm = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
    let s = norm(start);
    let e = norm(end.unwrap_or(r));
    (s, e.max(s))
}

pub fn shape(x: &Tensor, start: i64, end: Option<i64>) -> Tensor {
    let (s, e) = shape_range(x.rank(), start, end);
    Tensor::from_vec(vec![e - s], x.shape[s..e].iter().map(|&d| d as i64).collect())
}

pub fn constant_of_shape(shape: &Tensor, value: &Tensor) -> Result<Tensor, String> {
    let dims: Vec<usize> = shape
        .to_i64_vec()?
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("negative dimension {d}")))
        .collect::<Result<_, _>>()?;
    check_size(&dims)?;
    let n: usize = dims.iter().product();
    Ok(value.take(dims, &vec![0; n]))
}

pub fn range(start: &Tensor, limit: &Tensor, delta: &Tensor) -> Result<Tensor, String> {
    if start.len() != 1 || limit.len() != 1 || delta.len() != 1 {
        return Err("Range inputs must be scalars".into());
    }
    let dtype = start.dtype();
    if limit.dtype() != dtype || delta.dtype() != dtype {
        return Err("Range inputs must have one type".into());
    }
    if dtype.is_float() {
        let (s, l, d) = (start.data.get_f64(0), limit.data.get_f64(0), delta.data.get_f64(0));
        if d == 0.0 {
            return Err("Range delta cannot be 0".into());
        }
        let n = ((l - s) / d).ceil().max(0.0);
        // NaN (an infinite range) fails this test too.
        if n.is_nan() || n > MAX_ELEMENTS as f64 {
            return Err(format!("Range({s}, {l}, {d}) would have {n} elements"));
        }
        let n = n as usize;
        // Computed in the element type, like the spec's reference (start + i*delta).
        let v: Vec<f64> = (0..n).map(|i| s + i as f64 * d).collect();
        return Ok(Tensor::from_vec(vec![n], v).cast(dtype));
    }
    let (s, l, d) = (start.to_i64_vec()?[0], limit.to_i64_vec()?[0], delta.to_i64_vec()?[0]);
    if d == 0 {
        return Err("Range delta cannot be 0".into());
    }
    let span = l as i128 - s as i128;
    let n = ((span + d as i128 - d.signum() as i128) / d as i128).max(0) as usize;
    if n > MAX_ELEMENTS {
        return Err(format!("Range would have {n} elements"));
    }
    Ok(Tensor::from_vec(vec![n], (0..n as i64).map(|i| s + i * d).collect::<Vec<i64>>()).cast(dtype))
}

pub fn trilu(x: &Tensor, k: Option<&Tensor>, upper: bool) -> Result<Tensor, String> {
    if x.rank() < 2 {
        return Err("Trilu needs rank >= 2".into());
    }
    let k = match k {
        Some(t) => *t.to_i64_vec()?.first().ok_or("Trilu k must be a scalar")?,
        None => 0,
    };
    let (r, c) = (x.shape[x.rank() - 2], x.shape[x.rank() - 1]);
    let zero = Tensor::zeros(x.dtype(), vec![1]);
    let mut out = x.clone();
    // Keep element (i, j) when j - i >= k (upper) or j - i <= k (lower); zero the rest.
    let keep: Vec<bool> = (0..x.len())
        .map(|e| {
            let (i, j) = (((e / c) % r) as i64, (e % c) as i64);
            if upper {
                j - i >= k
            } else {
                j - i <= k
            }
        })
        .collect();
    let cond = Tensor::from_vec(x.shape.clone(), keep);
    if !x.is_empty() {
        out = super::elementwise::where_(&cond, x, &zero)?;
    }
    Ok(out)
}

//! Gather, GatherElements and GatherND: index arithmetic with bounds checks
//! (negative indices count from the end, as ONNX allows).

use super::normalize::norm_axis;
use crate::ir::tensor::strides;
use crate::ir::Tensor;

fn index_in(i: i64, dim: usize) -> Result<usize, String> {
    let j = if i < 0 { i + dim as i64 } else { i };
    if j < 0 || j >= dim as i64 {
        return Err(format!("index {i} is out of bounds for a dimension of size {dim}"));
    }
    Ok(j as usize)
}

pub fn gather(data: &Tensor, indices: &Tensor, axis: i64) -> Result<Tensor, String> {
    let ax = norm_axis(axis, data.rank())?;
    let idx = indices.to_i64_vec()?;
    let dim = data.shape[ax];
    let idx: Vec<usize> = idx.iter().map(|&i| index_in(i, dim)).collect::<Result<_, _>>()?;
    let outer: usize = data.shape[..ax].iter().product();
    let inner: usize = data.shape[ax + 1..].iter().product();
    let mut map = Vec::with_capacity(outer * idx.len() * inner);
    for o in 0..outer {
        for &i in &idx {
            let base = (o * dim + i) * inner;
            map.extend(base..base + inner);
        }
    }
    let mut shape = data.shape[..ax].to_vec();
    shape.extend_from_slice(&indices.shape);
    shape.extend_from_slice(&data.shape[ax + 1..]);
    Ok(data.take(shape, &map))
}

pub fn gather_elements(data: &Tensor, indices: &Tensor, axis: i64) -> Result<Tensor, String> {
    let ax = norm_axis(axis, data.rank())?;
    if indices.rank() != data.rank() {
        return Err("GatherElements indices must have the data's rank".into());
    }
    let idx = indices.to_i64_vec()?;
    let ds = strides(&data.shape);
    let is = strides(&indices.shape);
    let mut map = Vec::with_capacity(idx.len());
    for (e, &i) in idx.iter().enumerate() {
        let mut off = 0;
        for a in 0..data.rank() {
            let c = (e / is[a]) % indices.shape[a];
            let c = if a == ax { index_in(i, data.shape[a])? } else { c };
            if c >= data.shape[a] {
                return Err(format!("indices {:?} exceed data {:?}", indices.shape, data.shape));
            }
            off += c * ds[a];
        }
        map.push(off);
    }
    Ok(data.take(indices.shape.clone(), &map))
}

pub fn gather_nd(data: &Tensor, indices: &Tensor, batch_dims: i64) -> Result<Tensor, String> {
    let b = usize::try_from(batch_dims).map_err(|_| "batch_dims must be >= 0".to_string())?;
    let q = indices.rank();
    if q == 0 || b >= q || b > data.rank() {
        return Err("GatherND indices rank is too small for batch_dims".into());
    }
    let k = indices.shape[q - 1];
    if b + k > data.rank() || data.shape[..b] != indices.shape[..b] {
        return Err(format!("GatherND indices {:?} do not fit data {:?}", indices.shape, data.shape));
    }
    let idx = indices.to_i64_vec()?;
    let ds = strides(&data.shape);
    let slice: usize = data.shape[b + k..].iter().product();
    let batch: usize = data.shape[..b].iter().product();
    let per_batch_tuples: usize = indices.shape[b..q - 1].iter().product();
    let batch_stride: usize = data.shape[b..].iter().product();
    let mut map = Vec::new();
    for bi in 0..batch {
        for t in 0..per_batch_tuples {
            let tuple = &idx[(bi * per_batch_tuples + t) * k..(bi * per_batch_tuples + t + 1) * k];
            let mut off = bi * batch_stride;
            for (j, &i) in tuple.iter().enumerate() {
                off += index_in(i, data.shape[b + j])? * ds[b + j];
            }
            map.extend(off..off + slice);
        }
    }
    let mut shape = indices.shape[..q - 1].to_vec();
    shape.extend_from_slice(&data.shape[b + k..]);
    Ok(data.take(shape, &map))
}

//! Helpers shared by the integration tests.
#![allow(dead_code)]

use edgec::ir::{Data, Tensor};
use std::path::PathBuf;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Compares two tensors: same dtype and shape; integers and bools exactly;
/// floats with |got - want| <= atol + rtol * |want|, NaN only where NaN is expected.
pub fn compare(got: &Tensor, want: &Tensor, rtol: f64, atol: f64) -> Result<(), String> {
    if got.dtype() != want.dtype() {
        return Err(format!("dtype {} != expected {}", got.dtype(), want.dtype()));
    }
    if got.shape != want.shape {
        return Err(format!("shape {:?} != expected {:?}", got.shape, want.shape));
    }
    let float = matches!(want.data, Data::F32(_) | Data::F64(_));
    let (g, w) = (got.to_f64_vec(), want.to_f64_vec());
    let mut worst: Option<(usize, f64)> = None;
    for i in 0..w.len() {
        let (a, b) = (g[i], w[i]);
        let ok = if !float {
            a == b
        } else if b.is_nan() || a.is_nan() {
            a.is_nan() && b.is_nan()
        } else if b.is_infinite() || a.is_infinite() {
            a == b
        } else {
            (a - b).abs() <= atol + rtol * b.abs()
        };
        if !ok {
            let excess = (a - b).abs();
            if worst.is_none_or(|(_, e)| excess > e || e.is_nan()) {
                worst = Some((i, excess));
            }
        }
    }
    match worst {
        None => Ok(()),
        Some((i, _)) => Err(format!("element {i}: got {} expected {} (rtol {rtol}, atol {atol})", g[i], w[i])),
    }
}

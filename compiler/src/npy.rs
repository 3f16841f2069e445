//! numpy `.npy` files for `edgec run` inputs and outputs (via the npyz crate).

use crate::ir::{Data, Tensor};
use npyz::WriterBuilder;
use std::io::{Read, Write};
use std::path::Path;

fn shape_of(npy_shape: &[u64]) -> Vec<usize> {
    npy_shape.iter().map(|&d| d as usize).collect()
}

pub fn read_npy_from(r: impl Read, what: &str) -> Result<Tensor, String> {
    let npy = npyz::NpyFile::new(r).map_err(|e| format!("{what}: not a valid .npy file: {e}"))?;
    if npy.order() != npyz::Order::C {
        return Err(format!("{what}: Fortran-ordered arrays are not supported; save with np.ascontiguousarray"));
    }
    let shape = shape_of(npy.shape());
    let descr = match npy.dtype() {
        npyz::DType::Plain(ts) => ts.to_string(),
        other => return Err(format!("{what}: unsupported array dtype {other:?}")),
    };
    let err = |e: std::io::Error| format!("{what}: {e}");
    // Little-endian (or byte-order-free) descriptors only: what numpy writes on every common machine.
    let data = match descr.as_str() {
        "<f4" => Data::F32(npy.into_vec::<f32>().map_err(err)?),
        "<f8" => Data::F64(npy.into_vec::<f64>().map_err(err)?),
        "|i1" => Data::I8(npy.into_vec::<i8>().map_err(err)?),
        "|u1" => Data::U8(npy.into_vec::<u8>().map_err(err)?),
        "<i4" => Data::I32(npy.into_vec::<i32>().map_err(err)?),
        "<i8" => Data::I64(npy.into_vec::<i64>().map_err(err)?),
        "|b1" => Data::Bool(npy.into_vec::<bool>().map_err(err)?),
        other => return Err(format!("{what}: unsupported array dtype '{other}'")),
    };
    Tensor::new(shape, data).map_err(|e| format!("{what}: {e}"))
}

pub fn read_npy(path: &Path) -> Result<Tensor, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    read_npy_from(std::io::BufReader::new(f), &path.display().to_string())
}

pub fn write_npy_to(w: impl Write, t: &Tensor) -> std::io::Result<()> {
    let shape: Vec<u64> = t.shape.iter().map(|&d| d as u64).collect();
    macro_rules! write_all {
        ($v:expr, $ty:ty) => {{
            let mut writer = npyz::WriteOptions::<$ty>::new().default_dtype().shape(&shape).writer(w).begin_nd()?;
            writer.extend($v.iter().copied())?;
            writer.finish()
        }};
    }
    match &t.data {
        Data::F32(v) => write_all!(v, f32),
        Data::F64(v) => write_all!(v, f64),
        Data::I8(v) => write_all!(v, i8),
        Data::U8(v) => write_all!(v, u8),
        Data::I32(v) => write_all!(v, i32),
        Data::I64(v) => write_all!(v, i64),
        Data::Bool(v) => write_all!(v, bool),
    }
}

pub fn write_npy(path: &Path, t: &Tensor) -> Result<(), String> {
    let f = std::fs::File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let mut w = std::io::BufWriter::new(f);
    write_npy_to(&mut w, t).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    w.flush().map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_dtype() {
        let cases = vec![
            Tensor::from_vec(vec![2, 3], vec![1.5f32, -2.0, 3.25, 0.0, f32::MAX, -1e-30]),
            Tensor::from_vec(vec![2], vec![1.5f64, -7.0]),
            Tensor::from_vec(vec![3], vec![-128i8, 0, 127]),
            Tensor::from_vec(vec![1, 2], vec![0u8, 255]),
            Tensor::from_vec(vec![2], vec![i32::MIN, 5]),
            Tensor::from_vec(vec![2, 1], vec![i64::MAX, -3]),
            Tensor::from_vec(vec![3], vec![true, false, true]),
            Tensor::scalar(4.0f32),
        ];
        for t in cases {
            let mut buf = Vec::new();
            write_npy_to(&mut buf, &t).unwrap();
            let back = read_npy_from(&buf[..], "test").unwrap();
            assert_eq!(back, t);
            assert_eq!(back.dtype(), t.dtype());
        }
    }

    #[test]
    fn rejects_garbage() {
        let err = read_npy_from(&b"not an npy file at all"[..], "x.npy").unwrap_err();
        assert!(err.contains("x.npy"), "{err}");
    }
}

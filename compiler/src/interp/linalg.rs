//! MatMul (numpy semantics), Gemm and MatMulInteger.

use super::broadcast::{broadcast_index, broadcast_shapes};
use crate::ir::{Data, Tensor};

/// Multiply-accumulate; integer types wrap (ONNX accumulates in the output type).
pub trait MulAcc: Copy + Default {
    fn mul_acc(self, a: Self, b: Self) -> Self;
}
impl MulAcc for f32 {
    fn mul_acc(self, a: f32, b: f32) -> f32 {
        self + a * b
    }
}
impl MulAcc for f64 {
    fn mul_acc(self, a: f64, b: f64) -> f64 {
        self + a * b
    }
}
impl MulAcc for i32 {
    fn mul_acc(self, a: i32, b: i32) -> i32 {
        self.wrapping_add(a.wrapping_mul(b))
    }
}
impl MulAcc for i64 {
    fn mul_acc(self, a: i64, b: i64) -> i64 {
        self.wrapping_add(a.wrapping_mul(b))
    }
}

/// C[m,n] += A[m,k] * B[k,n], row by row so the inner loop runs over contiguous
/// rows of B and C (and vectorises).
fn matmul_2d<T: MulAcc>(a: &[T], b: &[T], c: &mut [T], m: usize, k: usize, n: usize) {
    for i in 0..m {
        let crow = &mut c[i * n..(i + 1) * n];
        for p in 0..k {
            let av = a[i * k + p];
            let brow = &b[p * n..(p + 1) * n];
            for (cv, &bv) in crow.iter_mut().zip(brow) {
                *cv = cv.mul_acc(av, bv);
            }
        }
    }
}

/// Batched, broadcast matmul over generic element vectors.
fn batched<T: MulAcc>(a: &[T], a_shape: &[usize], b: &[T], b_shape: &[usize]) -> Result<(Vec<usize>, Vec<T>), String> {
    // 1-D operands are promoted to matrices and the added axis dropped afterwards.
    let (a_sh, drop_m) = if a_shape.len() == 1 { (vec![1, a_shape[0]], true) } else { (a_shape.to_vec(), false) };
    let (b_sh, drop_n) = if b_shape.len() == 1 { (vec![b_shape[0], 1], true) } else { (b_shape.to_vec(), false) };
    if a_sh.len() < 2 || b_sh.len() < 2 {
        return Err("MatMul operands must have rank >= 1".into());
    }
    let (m, k) = (a_sh[a_sh.len() - 2], a_sh[a_sh.len() - 1]);
    let (k2, n) = (b_sh[b_sh.len() - 2], b_sh[b_sh.len() - 1]);
    if k != k2 {
        return Err(format!("MatMul inner dimensions differ: {a_shape:?} x {b_shape:?}"));
    }
    let a_batch = &a_sh[..a_sh.len() - 2];
    let b_batch = &b_sh[..b_sh.len() - 2];
    let batch = broadcast_shapes(&[a_batch, b_batch])?;
    let nb: usize = batch.iter().product();
    let ia = broadcast_index(a_batch, &batch);
    let ib = broadcast_index(b_batch, &batch);
    let mut out_shape = batch.clone();
    out_shape.extend([m, n]);
    super::broadcast::check_size(&out_shape)?;
    let mut out = vec![T::default(); nb * m * n];
    for bi in 0..nb {
        let (ao, bo) = (ia[bi] * m * k, ib[bi] * k * n);
        matmul_2d(&a[ao..ao + m * k], &b[bo..bo + k * n], &mut out[bi * m * n..(bi + 1) * m * n], m, k, n);
    }
    let mut shape = batch;
    if !drop_m {
        shape.push(m);
    }
    if !drop_n {
        shape.push(n);
    }
    Ok((shape, out))
}

pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor, String> {
    macro_rules! go {
        ($x:expr, $y:expr, $variant:ident) => {{
            let (shape, v) = batched($x, &a.shape, $y, &b.shape)?;
            Ok(Tensor { shape, data: Data::$variant(v) })
        }};
    }
    match (&a.data, &b.data) {
        (Data::F32(x), Data::F32(y)) => go!(x, y, F32),
        (Data::F64(x), Data::F64(y)) => go!(x, y, F64),
        (Data::I32(x), Data::I32(y)) => go!(x, y, I32),
        (Data::I64(x), Data::I64(y)) => go!(x, y, I64),
        _ => Err(format!("MatMul of {} and {} is not supported", a.dtype(), b.dtype())),
    }
}

pub fn gemm(
    a: &Tensor,
    b: &Tensor,
    c: Option<&Tensor>,
    alpha: f32,
    beta: f32,
    ta: bool,
    tb: bool,
) -> Result<Tensor, String> {
    if a.rank() != 2 || b.rank() != 2 {
        return Err(format!("Gemm needs matrices, got {:?} and {:?}", a.shape, b.shape));
    }
    let at = if ta { super::shape_ops::transpose(a, Some(&[1, 0]))? } else { a.clone() };
    let bt = if tb { super::shape_ops::transpose(b, Some(&[1, 0]))? } else { b.clone() };
    let mut y = matmul(&at, &bt)?;
    let dtype = y.dtype();
    if !dtype.is_float() {
        return Err(format!("Gemm of {dtype} is not supported"));
    }
    if alpha != 1.0 {
        y = super::elementwise::binary(crate::ir::BinaryOp::Mul, &y, &Tensor::scalar(alpha as f64).cast(dtype))?;
    }
    if let Some(c) = c {
        let bc = super::elementwise::binary(crate::ir::BinaryOp::Mul, c, &Tensor::scalar(beta as f64).cast(dtype))?;
        let shape = y.shape.clone();
        y = super::elementwise::binary(crate::ir::BinaryOp::Add, &y, &bc)?;
        if y.shape != shape {
            return Err(format!("Gemm bias {:?} does not broadcast to {:?}", c.shape, shape));
        }
    }
    Ok(y)
}

/// Integer matmul with zero points: (A - a_zp) x (B - b_zp) in i32.
/// a_zp is a scalar or one value per row of A; b_zp a scalar or one per column of B.
pub fn matmul_integer(a: &Tensor, b: &Tensor, a_zp: Option<&Tensor>, b_zp: Option<&Tensor>) -> Result<Tensor, String> {
    let widen = |t: &Tensor| -> Result<Vec<i32>, String> {
        match &t.data {
            Data::U8(v) => Ok(v.iter().map(|&x| x as i32).collect()),
            Data::I8(v) => Ok(v.iter().map(|&x| x as i32).collect()),
            _ => Err(format!("MatMulInteger takes 8-bit integers, got {}", t.dtype())),
        }
    };
    let mut av = widen(a)?;
    let mut bv = widen(b)?;
    if let Some(zp) = a_zp {
        if zp.dtype() != a.dtype() {
            return Err("a_zero_point must have A's type".into());
        }
        let z = widen(zp)?;
        let k = *a.shape.last().ok_or("A must have rank >= 1")?;
        let rows = av.len() / k.max(1);
        if z.len() != 1 && (a.rank() < 2 || z.len() != a.shape[a.rank() - 2]) {
            return Err(format!("a_zero_point of {} values does not match A {:?}", z.len(), a.shape));
        }
        for r in 0..rows {
            let zr = if z.len() == 1 { z[0] } else { z[r % z.len()] };
            av[r * k..(r + 1) * k].iter_mut().for_each(|x| *x -= zr);
        }
    }
    if let Some(zp) = b_zp {
        if zp.dtype() != b.dtype() {
            return Err("b_zero_point must have B's type".into());
        }
        let z = widen(zp)?;
        let n = *b.shape.last().ok_or("B must have rank >= 1")?;
        if z.len() != 1 && z.len() != n {
            return Err(format!("b_zero_point of {} values does not match B {:?}", z.len(), b.shape));
        }
        for (i, x) in bv.iter_mut().enumerate() {
            *x -= if z.len() == 1 { z[0] } else { z[i % n] };
        }
    }
    let (shape, v) = batched(&av, &a.shape, &bv, &b.shape)?;
    Ok(Tensor::from_vec(shape, v))
}

/// A fused matmul's epilogue on the product `y` [..., Nw] (f32): `act(y + bias)`, or with `glu`
/// `act(y[..., :N]) * y[..., N:]` (N = Nw / 2), each element in f64 and rounded once.
pub fn matmul_epilogue(y: &Tensor, bias: Option<&Tensor>, act: crate::ir::Act, glu: bool) -> Result<Tensor, String> {
    let v = y.as_slice::<f32>()?;
    let nw = *y.shape.last().ok_or("MatMulAct output has rank 0")?;
    let b: Option<&[f32]> = bias.map(|b| b.as_slice::<f32>()).transpose()?;
    if b.is_some_and(|b| b.len() != nw) {
        return Err(format!("MatMulAct bias has {} values for {nw} columns", b.unwrap().len()));
    }
    let n = if glu { nw / 2 } else { nw };
    let mut out = Vec::with_capacity(v.len() / nw.max(1) * n);
    for row in v.chunks_exact(nw.max(1)) {
        for j in 0..n {
            let x = row[j] as f64 + b.map_or(0.0, |b| b[j] as f64);
            let r = if glu { act.apply(x) * row[n + j] as f64 } else { act.apply(x) };
            out.push(r as f32);
        }
    }
    let mut shape = y.shape.clone();
    *shape.last_mut().unwrap() = n;
    Ok(Tensor::from_vec(shape, out))
}

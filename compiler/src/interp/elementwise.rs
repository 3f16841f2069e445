//! Elementwise ops: unary math, binary arithmetic/comparison/logic with
//! broadcasting, variadic Min/Max/Sum/Mean, Where, Clip and Cast.

use super::broadcast::{broadcast_shapes, zip_broadcast};
use super::math::{erf, round_half_even};
use crate::ir::{BinaryOp, DType, Data, Elem, Tensor, UnaryOp, VariadicOp};

fn map_float(t: &Tensor, f: impl Fn(f64) -> f64) -> Result<Tensor, String> {
    let data = match &t.data {
        Data::F32(v) => Data::F32(v.iter().map(|&x| f(x as f64) as f32).collect()),
        Data::F64(v) => Data::F64(v.iter().map(|&x| f(x)).collect()),
        _ => return Err(format!("needs a float tensor, got {}", t.dtype())),
    };
    Ok(Tensor { shape: t.shape.clone(), data })
}

fn map_to_bool(t: &Tensor, f: impl Fn(f64) -> bool) -> Result<Tensor, String> {
    if !t.dtype().is_float() {
        return Err(format!("needs a float tensor, got {}", t.dtype()));
    }
    Ok(Tensor::from_vec(t.shape.clone(), (0..t.len()).map(|i| f(t.data.get_f64(i))).collect()))
}

/// Signed ops that also apply to integers (Neg, Abs, Relu, Sign).
fn map_signed(t: &Tensor, fi: impl Fn(i64) -> i64, ff: impl Fn(f64) -> f64) -> Result<Tensor, String> {
    let data = match &t.data {
        Data::I8(v) => Data::I8(v.iter().map(|&x| fi(x as i64) as i8).collect()),
        Data::I32(v) => Data::I32(v.iter().map(|&x| fi(x as i64) as i32).collect()),
        Data::I64(v) => Data::I64(v.iter().map(|&x| fi(x)).collect()),
        Data::U8(v) => Data::U8(v.iter().map(|&x| fi(x as i64) as u8).collect()),
        Data::F32(_) | Data::F64(_) => return map_float(t, ff),
        Data::Bool(_) => return Err("needs a numeric tensor, got bool".into()),
    };
    Ok(Tensor { shape: t.shape.clone(), data })
}

pub fn unary(op: &UnaryOp, x: &Tensor) -> Result<Tensor, String> {
    use UnaryOp::*;
    match *op {
        Neg => map_signed(x, |v| v.wrapping_neg(), |v| -v),
        Abs => map_signed(x, |v| v.wrapping_abs(), f64::abs),
        Relu => map_signed(x, |v| v.max(0), |v| if v > 0.0 { v } else { 0.0 }),
        Sign => map_signed(x, i64::signum, |v| {
            if v > 0.0 {
                1.0
            } else if v < 0.0 {
                -1.0
            } else {
                v
            }
        }),
        Sqrt => map_float(x, f64::sqrt),
        Reciprocal => map_float(x, |v| 1.0 / v),
        Exp => map_float(x, f64::exp),
        Log => map_float(x, f64::ln),
        Erf => map_float(x, erf),
        Tanh => map_float(x, f64::tanh),
        Sigmoid => map_float(x, |v| 1.0 / (1.0 + (-v).exp())),
        Floor => map_float(x, f64::floor),
        Ceil => map_float(x, f64::ceil),
        Round => map_float(x, round_half_even),
        Sin => map_float(x, f64::sin),
        Cos => map_float(x, f64::cos),
        Softplus => map_float(x, |v| if v > 30.0 { v } else { v.exp().ln_1p() }),
        HardSwish => map_float(x, |v| v * (v / 6.0 + 0.5).clamp(0.0, 1.0)),
        LeakyRelu { alpha } => map_float(x, |v| if v >= 0.0 { v } else { alpha as f64 * v }),
        Elu { alpha } => map_float(x, |v| if v >= 0.0 { v } else { alpha as f64 * (v.exp() - 1.0) }),
        HardSigmoid { alpha, beta } => map_float(x, |v| (alpha as f64 * v + beta as f64).clamp(0.0, 1.0)),
        Gelu { tanh_approx: false } => map_float(x, |v| 0.5 * v * (1.0 + erf(v / std::f64::consts::SQRT_2))),
        Gelu { tanh_approx: true } => map_float(x, |v| {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * v * (1.0 + (c * (v + 0.044715 * v * v * v)).tanh())
        }),
        IsNaN => map_to_bool(x, f64::is_nan),
        IsInf { detect_negative, detect_positive } => {
            map_to_bool(x, |v| (v == f64::INFINITY && detect_positive) || (v == f64::NEG_INFINITY && detect_negative))
        }
        Not => {
            let v = x.as_slice::<bool>()?;
            Ok(Tensor::from_vec(x.shape.clone(), v.iter().map(|b| !b).collect()))
        }
    }
}

fn zip<T: Elem, R: Elem>(a: &Tensor, b: &Tensor, shape: &[usize], f: impl Fn(T, T) -> R) -> Result<Tensor, String> {
    let v = zip_broadcast(a.as_slice::<T>()?, &a.shape, b.as_slice::<T>()?, &b.shape, shape, f);
    Ok(Tensor::from_vec(shape.to_vec(), v))
}

fn compare<T: Elem>(op: BinaryOp, a: &Tensor, b: &Tensor, s: &[usize]) -> Result<Tensor, String> {
    match op {
        BinaryOp::Equal => zip::<T, bool>(a, b, s, |x, y| x == y),
        BinaryOp::Less => zip::<T, bool>(a, b, s, |x, y| x < y),
        BinaryOp::LessOrEqual => zip::<T, bool>(a, b, s, |x, y| x <= y),
        BinaryOp::Greater => zip::<T, bool>(a, b, s, |x, y| x > y),
        BinaryOp::GreaterOrEqual => zip::<T, bool>(a, b, s, |x, y| x >= y),
        _ => unreachable!("only called for comparisons"),
    }
}

macro_rules! float_arith {
    ($t:ty, $op:expr, $a:expr, $b:expr, $s:expr) => {
        match $op {
            BinaryOp::Add => zip::<$t, $t>($a, $b, $s, |x, y| x + y),
            BinaryOp::Sub => zip::<$t, $t>($a, $b, $s, |x, y| x - y),
            BinaryOp::Mul => zip::<$t, $t>($a, $b, $s, |x, y| x * y),
            BinaryOp::Div => zip::<$t, $t>($a, $b, $s, |x, y| x / y),
            BinaryOp::Pow => zip::<$t, $t>($a, $b, $s, |x, y| x.powf(y)),
            BinaryOp::Mod { fmod: true } => zip::<$t, $t>($a, $b, $s, |x, y| x % y),
            // fmod=0 on floats: the remainder takes the divisor's sign (Python's %).
            BinaryOp::Mod { fmod: false } => zip::<$t, $t>($a, $b, $s, |x, y| {
                let r = x % y;
                if r != 0.0 && ((r < 0.0) != (y < 0.0)) {
                    r + y
                } else {
                    r
                }
            }),
            _ => Err(format!("{:?} is not defined for floats", $op)),
        }
    };
}

macro_rules! int_arith {
    ($t:ty, $op:expr, $a:expr, $b:expr, $s:expr) => {{
        if matches!($op, BinaryOp::Div | BinaryOp::Mod { .. }) && $b.as_slice::<$t>()?.contains(&0) {
            return Err("integer division by zero".into());
        }
        match $op {
            BinaryOp::Add => zip::<$t, $t>($a, $b, $s, |x, y| x.wrapping_add(y)),
            BinaryOp::Sub => zip::<$t, $t>($a, $b, $s, |x, y| x.wrapping_sub(y)),
            BinaryOp::Mul => zip::<$t, $t>($a, $b, $s, |x, y| x.wrapping_mul(y)),
            BinaryOp::Div => zip::<$t, $t>($a, $b, $s, |x, y| x.wrapping_div(y)),
            BinaryOp::Pow => zip::<$t, $t>($a, $b, $s, |x, y| (x as f64).powf(y as f64) as $t),
            // fmod=1: C semantics (sign of the dividend); fmod=0: sign of the divisor.
            BinaryOp::Mod { fmod: true } => zip::<$t, $t>($a, $b, $s, |x, y| x.wrapping_rem(y)),
            BinaryOp::Mod { fmod: false } => zip::<$t, $t>($a, $b, $s, |x, y| {
                let r = x.wrapping_rem(y);
                #[allow(unused_comparisons)]
                if r != 0 && ((r < 0) != (y < 0)) {
                    r.wrapping_add(y)
                } else {
                    r
                }
            }),
            _ => Err(format!("{:?} is not defined for integers", $op)),
        }
    }};
}

pub fn binary(op: BinaryOp, a: &Tensor, b: &Tensor) -> Result<Tensor, String> {
    let shape = broadcast_shapes(&[&a.shape, &b.shape])?;
    // Pow allows an exponent of another numeric type: compute in the base's type.
    let b_cast;
    let b = if op == BinaryOp::Pow && a.dtype() != b.dtype() {
        b_cast = b.cast(a.dtype());
        &b_cast
    } else {
        b
    };
    if a.dtype() != b.dtype() {
        return Err(format!("operands have different types: {} and {}", a.dtype(), b.dtype()));
    }
    let s = &shape[..];
    if op.is_logical() {
        let f = match op {
            BinaryOp::And => |x: bool, y: bool| x & y,
            BinaryOp::Or => |x: bool, y: bool| x | y,
            _ => |x: bool, y: bool| x ^ y,
        };
        return zip::<bool, bool>(a, b, s, f);
    }
    if op.is_comparison() {
        return match a.dtype() {
            DType::F32 => compare::<f32>(op, a, b, s),
            DType::F64 => compare::<f64>(op, a, b, s),
            DType::I8 => compare::<i8>(op, a, b, s),
            DType::U8 => compare::<u8>(op, a, b, s),
            DType::I32 => compare::<i32>(op, a, b, s),
            DType::I64 => compare::<i64>(op, a, b, s),
            DType::Bool => compare::<bool>(op, a, b, s),
        };
    }
    match a.dtype() {
        DType::F32 => float_arith!(f32, op, a, b, s),
        DType::F64 => float_arith!(f64, op, a, b, s),
        DType::I8 => int_arith!(i8, op, a, b, s),
        DType::U8 => int_arith!(u8, op, a, b, s),
        DType::I32 => int_arith!(i32, op, a, b, s),
        DType::I64 => int_arith!(i64, op, a, b, s),
        DType::Bool => Err(format!("{op:?} is not defined for bool")),
    }
}

pub fn variadic(op: VariadicOp, xs: &[&Tensor]) -> Result<Tensor, String> {
    let mut acc = xs[0].clone();
    let bin = match op {
        VariadicOp::Sum | VariadicOp::Mean => None,
        _ => Some(op),
    };
    for x in &xs[1..] {
        acc = match bin {
            None => binary(BinaryOp::Add, &acc, x)?,
            Some(m) => {
                // Min/Max: pick per element; NaN propagates as in numpy's minimum/maximum.
                let take_b = binary(if m == VariadicOp::Max { BinaryOp::Less } else { BinaryOp::Greater }, &acc, x)?;
                let nan_b = if x.dtype().is_float() { Some(unary(&UnaryOp::IsNaN, x)?) } else { None };
                let sel = match nan_b {
                    Some(n) => binary(BinaryOp::Or, &take_b, &n)?,
                    None => take_b,
                };
                where_(&sel, x, &acc)?
            }
        };
    }
    if op == VariadicOp::Mean {
        let n = Tensor::scalar(xs.len() as f64).cast(acc.dtype());
        acc = binary(BinaryOp::Div, &acc, &n)?;
    }
    Ok(acc)
}

pub fn where_(cond: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor, String> {
    if a.dtype() != b.dtype() {
        return Err(format!("Where branches have different types: {} and {}", a.dtype(), b.dtype()));
    }
    let shape = broadcast_shapes(&[&cond.shape, &a.shape, &b.shape])?;
    let c = cond.as_slice::<bool>()?;
    let ic = super::broadcast::broadcast_index(&cond.shape, &shape);
    let ia = super::broadcast::broadcast_index(&a.shape, &shape);
    let ib = super::broadcast::broadcast_index(&b.shape, &shape);
    let data = match (&a.data, &b.data) {
        (Data::F32(x), Data::F32(y)) => Data::F32(pick(c, x, y, &ic, &ia, &ib)),
        (Data::F64(x), Data::F64(y)) => Data::F64(pick(c, x, y, &ic, &ia, &ib)),
        (Data::I8(x), Data::I8(y)) => Data::I8(pick(c, x, y, &ic, &ia, &ib)),
        (Data::U8(x), Data::U8(y)) => Data::U8(pick(c, x, y, &ic, &ia, &ib)),
        (Data::I32(x), Data::I32(y)) => Data::I32(pick(c, x, y, &ic, &ia, &ib)),
        (Data::I64(x), Data::I64(y)) => Data::I64(pick(c, x, y, &ic, &ia, &ib)),
        (Data::Bool(x), Data::Bool(y)) => Data::Bool(pick(c, x, y, &ic, &ia, &ib)),
        _ => unreachable!("types checked above"),
    };
    Ok(Tensor { shape, data })
}

fn pick<T: Copy>(c: &[bool], a: &[T], b: &[T], ic: &[usize], ia: &[usize], ib: &[usize]) -> Vec<T> {
    (0..ic.len()).map(|i| if c[ic[i]] { a[ia[i]] } else { b[ib[i]] }).collect()
}

pub fn clip(x: &Tensor, min: Option<&Tensor>, max: Option<&Tensor>) -> Result<Tensor, String> {
    let mut out = x.clone();
    for bound in [min, max].into_iter().flatten() {
        if bound.len() != 1 {
            return Err(format!("Clip bounds must be scalars, got shape {:?}", bound.shape));
        }
    }
    if let Some(lo) = min {
        let below = binary(BinaryOp::Less, &out, lo)?;
        out = where_(&below, &lo.clone().reshaped(vec![]), &out)?;
    }
    if let Some(hi) = max {
        let above = binary(BinaryOp::Greater, &out, hi)?;
        out = where_(&above, &hi.clone().reshaped(vec![]), &out)?;
    }
    Ok(out)
}

//! Concrete tensors: the values the reference interpreter computes and the form
//! constant folding works on. Row-major, owned, little-endian when serialized.

use super::dtype::DType;
use std::fmt;

#[derive(Clone, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I8(Vec<i8>),
    U8(Vec<u8>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    Bool(Vec<bool>),
}

/// Applies `$body` to the vector inside any `Data` variant, rebuilding the same variant.
#[macro_export]
macro_rules! map_data {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            $crate::ir::Data::F32($v) => $crate::ir::Data::F32($body),
            $crate::ir::Data::F64($v) => $crate::ir::Data::F64($body),
            $crate::ir::Data::I8($v) => $crate::ir::Data::I8($body),
            $crate::ir::Data::U8($v) => $crate::ir::Data::U8($body),
            $crate::ir::Data::I32($v) => $crate::ir::Data::I32($body),
            $crate::ir::Data::I64($v) => $crate::ir::Data::I64($body),
            $crate::ir::Data::Bool($v) => $crate::ir::Data::Bool($body),
        }
    };
}

/// Evaluates `$body` with the vector inside any `Data` variant bound to `$v`.
#[macro_export]
macro_rules! with_data {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            $crate::ir::Data::F32($v) => $body,
            $crate::ir::Data::F64($v) => $body,
            $crate::ir::Data::I8($v) => $body,
            $crate::ir::Data::U8($v) => $body,
            $crate::ir::Data::I32($v) => $body,
            $crate::ir::Data::I64($v) => $body,
            $crate::ir::Data::Bool($v) => $body,
        }
    };
}

/// A Rust scalar type that an IR tensor can hold.
pub trait Elem: Copy + PartialEq + PartialOrd + fmt::Debug + Default + 'static {
    const DTYPE: DType;
    fn wrap(v: Vec<Self>) -> Data;
    fn view(d: &Data) -> Option<&[Self]>;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
}

macro_rules! impl_elem {
    ($t:ty, $variant:ident, $dtype:ident) => {
        impl Elem for $t {
            const DTYPE: DType = DType::$dtype;
            fn wrap(v: Vec<Self>) -> Data {
                Data::$variant(v)
            }
            fn view(d: &Data) -> Option<&[Self]> {
                match d {
                    Data::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
        }
    };
}
impl_elem!(f32, F32, F32);
impl_elem!(f64, F64, F64);
impl_elem!(i8, I8, I8);
impl_elem!(u8, U8, U8);
impl_elem!(i32, I32, I32);
impl_elem!(i64, I64, I64);

impl Elem for bool {
    const DTYPE: DType = DType::Bool;
    fn wrap(v: Vec<Self>) -> Data {
        Data::Bool(v)
    }
    fn view(d: &Data) -> Option<&[Self]> {
        match d {
            Data::Bool(v) => Some(v),
            _ => None,
        }
    }
    fn from_f64(v: f64) -> Self {
        v != 0.0
    }
    fn to_f64(self) -> f64 {
        self as u8 as f64
    }
}

impl Data {
    pub fn dtype(&self) -> DType {
        match self {
            Data::F32(_) => DType::F32,
            Data::F64(_) => DType::F64,
            Data::I8(_) => DType::I8,
            Data::U8(_) => DType::U8,
            Data::I32(_) => DType::I32,
            Data::I64(_) => DType::I64,
            Data::Bool(_) => DType::Bool,
        }
    }

    pub fn len(&self) -> usize {
        with_data!(self, v => v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn zeros(dtype: DType, n: usize) -> Data {
        match dtype {
            DType::F32 => Data::F32(vec![0.0; n]),
            DType::F64 => Data::F64(vec![0.0; n]),
            DType::I8 => Data::I8(vec![0; n]),
            DType::U8 => Data::U8(vec![0; n]),
            DType::I32 => Data::I32(vec![0; n]),
            DType::I64 => Data::I64(vec![0; n]),
            DType::Bool => Data::Bool(vec![false; n]),
        }
    }

    /// Element `i` widened to f64 (exact for every type but large i64s).
    pub fn get_f64(&self, i: usize) -> f64 {
        with_data!(self, v => v[i].to_f64())
    }
}

#[derive(Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Data,
}

impl Tensor {
    /// Builds a tensor, checking that the element count matches the shape.
    pub fn new(shape: Vec<usize>, data: Data) -> Result<Tensor, String> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(format!("shape {:?} needs {n} elements but {} were given", shape, data.len()));
        }
        Ok(Tensor { shape, data })
    }

    pub fn from_vec<T: Elem>(shape: Vec<usize>, v: Vec<T>) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), v.len());
        Tensor { shape, data: T::wrap(v) }
    }

    pub fn scalar<T: Elem>(v: T) -> Tensor {
        Tensor::from_vec(vec![], vec![v])
    }

    pub fn zeros(dtype: DType, shape: Vec<usize>) -> Tensor {
        let n = shape.iter().product();
        Tensor { shape, data: Data::zeros(dtype, n) }
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The elements as `&[T]`, or an error naming both types.
    pub fn as_slice<T: Elem>(&self) -> Result<&[T], String> {
        T::view(&self.data).ok_or_else(|| format!("expected a {} tensor, got {}", T::DTYPE, self.dtype()))
    }

    /// Integer elements widened to i64 (shape, axes, indices inputs).
    pub fn to_i64_vec(&self) -> Result<Vec<i64>, String> {
        match &self.data {
            Data::I64(v) => Ok(v.clone()),
            Data::I32(v) => Ok(v.iter().map(|&x| x as i64).collect()),
            Data::I8(v) => Ok(v.iter().map(|&x| x as i64).collect()),
            Data::U8(v) => Ok(v.iter().map(|&x| x as i64).collect()),
            _ => Err(format!("expected an integer tensor, got {}", self.dtype())),
        }
    }

    pub fn to_f64_vec(&self) -> Vec<f64> {
        (0..self.len()).map(|i| self.data.get_f64(i)).collect()
    }

    /// A new tensor whose element `i` is `self[index[i]]` (every shape op reduces to this).
    pub fn take(&self, shape: Vec<usize>, index: &[usize]) -> Tensor {
        let data = map_data!(&self.data, v => index.iter().map(|&i| v[i]).collect());
        Tensor { shape, data }
    }

    pub fn reshaped(mut self, shape: Vec<usize>) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), self.len());
        self.shape = shape;
        self
    }

    /// Converts to another element type with ONNX `Cast` semantics
    /// (float -> int truncates toward zero, saturating as Rust's `as` does).
    pub fn cast(&self, to: DType) -> Tensor {
        fn conv<S: Elem, D: Elem>(v: &[S], f: impl Fn(S) -> D) -> Vec<D> {
            v.iter().map(|&x| f(x)).collect()
        }
        macro_rules! from_src {
            ($v:expr) => {
                match to {
                    DType::F32 => Data::F32(conv($v, |x| x.to_f64() as f32)),
                    DType::F64 => Data::F64(conv($v, |x| x.to_f64())),
                    DType::I8 => Data::I8(conv($v, |x| x.to_f64() as i8)),
                    DType::U8 => Data::U8(conv($v, |x| x.to_f64() as u8)),
                    DType::I32 => Data::I32(conv($v, |x| x.to_f64() as i32)),
                    DType::I64 => Data::I64(conv($v, |x| x.to_f64() as i64)),
                    DType::Bool => Data::Bool(conv($v, |x| x.to_f64() != 0.0)),
                }
            };
        }
        let data = match &self.data {
            // i64 -> f64 -> i64 loses precision past 2^53: convert integers directly.
            Data::I64(v) => match to {
                DType::I64 => Data::I64(v.clone()),
                DType::I32 => Data::I32(conv(v, |x| x as i32)),
                DType::I8 => Data::I8(conv(v, |x| x as i8)),
                DType::U8 => Data::U8(conv(v, |x| x as u8)),
                _ => from_src!(v),
            },
            other => with_data!(other, v => from_src!(v)),
        };
        Tensor { shape: self.shape.clone(), data }
    }

    /// Little-endian bytes, the layout of ONNX `raw_data` and of the constant store.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len() * self.dtype().size());
        match &self.data {
            Data::F32(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Data::F64(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Data::I8(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Data::U8(v) => out.extend_from_slice(v),
            Data::I32(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Data::I64(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Data::Bool(v) => v.iter().for_each(|&x| out.push(x as u8)),
        }
        out
    }

    /// Parses little-endian bytes; the length must match exactly.
    pub fn from_le_bytes(dtype: DType, shape: Vec<usize>, bytes: &[u8]) -> Result<Tensor, String> {
        let n: usize = shape.iter().product();
        let want = n.checked_mul(dtype.size()).ok_or("tensor size overflows")?;
        if bytes.len() != want {
            return Err(format!("{dtype}{shape:?} needs {want} bytes of data but {} are present", bytes.len()));
        }
        fn chunks<const N: usize, T>(b: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
            b.chunks_exact(N).map(|c| f(c.try_into().unwrap())).collect()
        }
        let data = match dtype {
            DType::F32 => Data::F32(chunks(bytes, f32::from_le_bytes)),
            DType::F64 => Data::F64(chunks(bytes, f64::from_le_bytes)),
            DType::I8 => Data::I8(bytes.iter().map(|&b| b as i8).collect()),
            DType::U8 => Data::U8(bytes.to_vec()),
            DType::I32 => Data::I32(chunks(bytes, i32::from_le_bytes)),
            DType::I64 => Data::I64(chunks(bytes, i64::from_le_bytes)),
            DType::Bool => Data::Bool(bytes.iter().map(|&b| b != 0).collect()),
        };
        Ok(Tensor { shape, data })
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}{:?}", self.dtype(), self.shape)?;
        if self.len() <= 16 {
            with_data!(&self.data, v => write!(f, " {:?}", v))?;
        }
        Ok(())
    }
}

/// Row-major strides of a shape, in elements.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

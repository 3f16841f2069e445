//! Tensors passed to and returned from `Model::run`, and the aligned buffer behind them.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use crate::format::DType;

/// Alignment of every buffer the runtime allocates (arena, outputs), as the spec asks for the arena.
pub const BUFFER_ALIGN: usize = 64;

/// A zero-initialised, 64-byte aligned byte buffer; allocation failure is an error, not an abort.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: the buffer owns its memory exclusively, like Vec<u8>.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> Option<AlignedBuf> {
        // A zero-size allocation is not allowed, so empty buffers still own one block.
        let layout = Layout::from_size_align(len.max(1), BUFFER_ALIGN).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc::alloc_zeroed(layout) })?;
        Some(AlignedBuf { ptr, len, layout })
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len` initialised bytes live at `ptr` for as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> Self {
        let mut copy = AlignedBuf::zeroed(self.len).unwrap_or_else(|| alloc::handle_alloc_error(self.layout));
        copy.copy_from_slice(self);
        copy
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TensorError {
    #[error("shape {0:?} has more bytes than memory can address")]
    Overflow(Vec<usize>),
    #[error("shape {shape:?} of {dtype} needs {expected} bytes, got {got}")]
    Length { dtype: DType, shape: Vec<usize>, expected: usize, got: usize },
    #[error("cannot allocate {0} bytes")]
    Alloc(usize),
}

/// Bytes of a dense tensor, or None on overflow.
pub fn byte_len(dtype: DType, shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
}

mod sealed {
    pub trait Sealed {}
}

/// Plain element types that can be viewed as bytes and back (bool has invalid bit patterns,
/// so bool tensors are built from bytes).
pub trait Element: Copy + sealed::Sealed + 'static {
    const DTYPE: DType;
}

macro_rules! element {
    ($($t:ty => $d:ident),*) => {$(
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: DType = DType::$d;
        }
    )*};
}
element!(f32 => F32, f64 => F64, i8 => I8, u8 => U8, i32 => I32, i64 => I64);

/// An owned dense row-major tensor in a 64-byte aligned buffer.
#[derive(Clone, Debug)]
pub struct Tensor {
    dtype: DType,
    shape: Vec<usize>,
    data: AlignedBuf,
}

impl Tensor {
    pub fn zeros(dtype: DType, shape: Vec<usize>) -> Result<Tensor, TensorError> {
        let len = byte_len(dtype, &shape).ok_or_else(|| TensorError::Overflow(shape.clone()))?;
        let data = AlignedBuf::zeroed(len).ok_or(TensorError::Alloc(len))?;
        Ok(Tensor { dtype, shape, data })
    }

    pub fn from_bytes(dtype: DType, shape: Vec<usize>, bytes: &[u8]) -> Result<Tensor, TensorError> {
        let mut t = Tensor::zeros(dtype, shape)?;
        if t.data.len() != bytes.len() {
            let (expected, got) = (t.data.len(), bytes.len());
            return Err(TensorError::Length { dtype, shape: t.shape, expected, got });
        }
        t.data.copy_from_slice(bytes);
        Ok(t)
    }

    pub fn from_slice<T: Element>(shape: Vec<usize>, values: &[T]) -> Result<Tensor, TensorError> {
        // SAFETY: Element types are plain numbers without padding, so their bytes are initialised.
        let bytes = unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values)) };
        Tensor::from_bytes(T::DTYPE, shape, bytes)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }

    /// The elements, when `T` matches the dtype.
    pub fn as_slice<T: Element>(&self) -> Option<&[T]> {
        if self.dtype != T::DTYPE {
            return None;
        }
        let n = self.data.len() / std::mem::size_of::<T>();
        // SAFETY: the buffer is 64-byte aligned, holds n elements' bytes, and every bit pattern
        // is a valid T.
        Some(unsafe { std::slice::from_raw_parts(self.data.as_ptr().cast::<T>(), n) })
    }

    pub fn view(&self) -> TensorView<'_> {
        TensorView { dtype: self.dtype, shape: &self.shape, data: &self.data }
    }
}

/// A borrowed input: dense row-major bytes, aligned to the element size.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    pub dtype: DType,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

//! The operand layout of `Op::MatMulNBits` (onnxruntime's contrib op), shared by the
//! interpreter, the quantization pass that writes it and the code generator that repacks it.

/// Shapes of a MatMulNBits weight: `n` columns, each of `blocks` blocks of `block_size` values
/// along K, `bits` per value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NBitsLayout {
    pub k: usize,
    pub n: usize,
    pub bits: usize,
    pub block_size: usize,
}

impl NBitsLayout {
    pub fn new(k: usize, n: usize, bits: usize, block_size: usize) -> Result<NBitsLayout, String> {
        if bits != 4 && bits != 8 {
            return Err(format!("MatMulNBits with bits={bits} is not supported (4 or 8)"));
        }
        if k == 0 || n == 0 || block_size == 0 || !(block_size * bits).is_multiple_of(8) {
            return Err(format!("MatMulNBits shape K={k} N={n} block_size={block_size} is invalid"));
        }
        Ok(NBitsLayout { k, n, bits, block_size })
    }
    pub fn blocks(&self) -> usize {
        self.k.div_ceil(self.block_size)
    }
    /// Bytes per block of one column.
    pub fn blob(&self) -> usize {
        self.block_size * self.bits / 8
    }
    /// Bytes of packed zero points per column.
    pub fn zp_cols(&self) -> usize {
        (self.blocks() * self.bits).div_ceil(8)
    }
    pub fn b_len(&self) -> usize {
        self.n * self.blocks() * self.blob()
    }
    /// The implied zero point when none is given.
    pub fn default_zero(&self) -> u8 {
        1 << (self.bits - 1)
    }
    /// The stored (unsigned) value of weight (k, col).
    pub fn q(&self, b: &[u8], k: usize, col: usize) -> u8 {
        let (blk, j) = (k / self.block_size, k % self.block_size);
        get(b, (col * self.blocks() + blk) * self.blob(), j, self.bits)
    }
    /// The zero point of (block, col).
    pub fn zero(&self, zp: Option<&[u8]>, blk: usize, col: usize) -> u8 {
        zp.map_or(self.default_zero(), |z| get(z, col * self.zp_cols(), blk, self.bits))
    }
    /// Checks operand lengths before any indexing.
    pub fn check(&self, b: usize, scales: usize, zp: Option<usize>) -> Result<(), String> {
        if b != self.b_len() {
            return Err(format!("MatMulNBits B has {b} bytes, {} expected", self.b_len()));
        }
        if scales != self.n * self.blocks() {
            return Err(format!("MatMulNBits has {scales} scales, {} expected", self.n * self.blocks()));
        }
        if let Some(z) = zp.filter(|&z| z != self.n * self.zp_cols()) {
            return Err(format!("MatMulNBits has {z} zero-point bytes, {} expected", self.n * self.zp_cols()));
        }
        Ok(())
    }
}

/// Value `index` of `bits` width in the packed run starting at byte `base` (low nibble first).
pub fn get(bytes: &[u8], base: usize, index: usize, bits: usize) -> u8 {
    if bits == 8 {
        bytes[base + index]
    } else {
        (bytes[base + index / 2] >> (4 * (index % 2))) & 0xf
    }
}

/// Stores `v` as value `index` of the packed run starting at `base`.
pub fn set(bytes: &mut [u8], base: usize, index: usize, bits: usize, v: u8) {
    if bits == 8 {
        bytes[base + index] = v;
    } else {
        let b = &mut bytes[base + index / 2];
        let sh = 4 * (index % 2);
        *b = (*b & !(0xf << sh)) | ((v & 0xf) << sh);
    }
}

/// Static activation quantization of a MatMulNBits: A is replaced by
/// `DequantizeLinear(QuantizeLinear(A, scale, zero), scale, zero)` (one scale for the tensor,
/// `dtype` int8 or uint8, round half to even, saturating) before the product, so kernels can take
/// integer dot products with a scale fixed at compile time. Written by `qdq-activations` (QDQ
/// pairs) and by `--quantize ... --act-static` (scales from calibration).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ActQuant {
    pub scale: f32,
    /// In `dtype`'s range.
    pub zero: i32,
    pub dtype: crate::ir::DType,
}

impl ActQuant {
    pub fn new(scale: f32, zero: i32, dtype: crate::ir::DType) -> Result<ActQuant, String> {
        let (lo, hi) = match dtype {
            crate::ir::DType::I8 => (-128, 127),
            crate::ir::DType::U8 => (0, 255),
            d => return Err(format!("static activation quantization to {d} is not supported (int8, uint8)")),
        };
        if !(scale.is_finite() && scale > 0.0) {
            return Err(format!("static activation scale {scale} must be positive and finite"));
        }
        if !(lo..=hi).contains(&zero) {
            return Err(format!("static activation zero point {zero} is out of {dtype}'s range"));
        }
        Ok(ActQuant { scale, zero, dtype })
    }
    /// The zero point of the activations as kernels store them, int8 (uint8 values minus 128).
    pub fn stored_zero(&self) -> i32 {
        if self.dtype == crate::ir::DType::U8 {
            self.zero - 128
        } else {
            self.zero
        }
    }
}

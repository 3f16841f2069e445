//! Weight layouts chosen at compile time, so the device does no repacking at load.
//!
//! f32 matmul weights: column panels of 16 floats per k step (`pack_panels`).
//! Quantized weights (`Op::MatMulNBits`): the same 16-column panels, each split into the blocks
//! along K, every block a record of its 16 scales (and, with zero points, 16 offsets `-zero *
//! scale`) followed by its rows of 16 quantized values, so a kernel streams one panel front to
//! back and dequantizes in registers (`NBitsPacking`).

use crate::ir::nbits::{ActQuant, NBitsLayout};

/// Columns per packed weight panel: one 64-byte line of f32 per k step.
pub const PANEL_COLS: usize = 16;

/// Repacks a K x N f32 matrix (element (k, n) at `k*ks + n*ns`) into column panels: panel p holds
/// columns 16p..16p+16 as K rows of 16 contiguous floats (zero-padded past N), so a matmul reads
/// B sequentially instead of striding a row of N floats per k step.
pub fn pack_panels(src: &[u8], k: usize, n: usize, ks: usize, ns: usize) -> Vec<u8> {
    let panels = n.div_ceil(PANEL_COLS);
    let mut out = vec![0u8; panels * k * PANEL_COLS * 4];
    for p in 0..panels {
        for kk in 0..k {
            for c in 0..PANEL_COLS.min(n - p * PANEL_COLS) {
                let s = (kk * ks + (p * PANEL_COLS + c) * ns) * 4;
                let d = ((p * k + kk) * PANEL_COLS + c) * 4;
                out[d..d + 4].copy_from_slice(&src[s..s + 4]);
            }
        }
    }
    out
}

/// The packed form of a MatMulNBits weight.
///
/// Rows: 8-bit without zero points hold `q - 128` as i8; 8-bit with zero points hold q as u8;
/// 4-bit rows are 8 bytes, byte c holding column c in its low nibble and column c + 8 in its high
/// nibble (without zero points the kernel subtracts the implied 8).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NBitsPacking {
    pub layout: NBitsLayout,
    /// Records carry offsets (the weight had zero points).
    pub asym: bool,
    /// Integer-dot form for int8 activations: records carry i32 zero points (only when the weight
    /// has them: a symmetric weight's zero is implied, 8 for 4 bits and 0 for the stored q - 128
    /// of 8 bits), and rows come in 64-byte chunks of 16 columns x 4 consecutive k (8 for 4 bits:
    /// k in the low nibble, k + 4 in the high one), so one 4-byte group of activations multiplies
    /// 4 columns at once.
    pub int_dot: bool,
    /// Static activation scale and zero point (else rounded per row and block at run time). In
    /// the integer-dot form a nonzero activation zero point gives every record 16 more i32,
    /// `zero_a * sum over the block of (q - zero_w)` per column, subtracted from the dot products.
    pub act: Option<ActQuant>,
    /// 8 bits: no stored weight (q - 128) is -128, so x86 can use pmaddubsw with each activation's
    /// sign moved onto its weights (|w|, |x| <= 127 and 128: the i16 pair sums stay exact).
    pub no_i8_min: bool,
}

/// Bytes ahead of the current k step that the weight-only 8-bit decode loop touches, so the next
/// lines are already on their way when it gets there (Cranelift has no prefetch instruction: a
/// plain load whose value is unused). The packed weights are padded by as much.
pub const TOUCH_AHEAD: usize = 4096;

/// Whether a MatMulNBits with int8 activations gets integer dot products (else its activations are
/// rounded to int8 and back in f32 and the float kernel runs).
pub fn int_dot_ok(bits: usize, block_size: usize, simd: bool) -> bool {
    simd && block_size.is_multiple_of(if bits == 4 { 8 } else { 4 })
}

/// Scratch bytes per row of A for a MatMulNBits with int8 activations: the int8 row (padded to
/// whole blocks) then per block its scale (f32) and sum(q) (i32); or the rounded f32 row.
pub fn activation_row_bytes(k: usize, block_size: usize, int_dot: bool) -> usize {
    let blocks = k.div_ceil(block_size);
    if int_dot {
        (blocks * block_size + 8 * blocks).next_multiple_of(16)
    } else {
        k * 4
    }
}

impl NBitsPacking {
    /// Offset of the per-block scales in a row of the activation scratch.
    pub fn act_scales_offset(&self) -> usize {
        self.layout.blocks() * self.layout.block_size
    }
    pub fn act_row_bytes(&self) -> usize {
        activation_row_bytes(self.layout.k, self.layout.block_size, self.int_dot)
    }

    pub fn row_bytes(&self) -> usize {
        PANEL_COLS * self.layout.bits / 8
    }
    pub fn header_bytes(&self) -> usize {
        PANEL_COLS * 4 * (1 + self.asym as usize + self.act_correction() as usize)
    }
    /// Records carry the activation zero point's correction (see `act`).
    pub fn act_correction(&self) -> bool {
        self.int_dot && self.act.is_some_and(|a| a.stored_zero() != 0)
    }
    /// Offset of the correction in a record.
    pub fn act_correction_offset(&self) -> usize {
        PANEL_COLS * 4 * (1 + self.asym as usize)
    }
    /// Bytes of padding after the packed weights: the weight-only 8-bit decode loop touches
    /// `TOUCH_AHEAD` bytes past its position (`qmatmul::block`).
    pub fn touch_pad(&self) -> usize {
        if self.layout.bits == 8 && !self.int_dot {
            TOUCH_AHEAD
        } else {
            0
        }
    }
    /// The zero point of a symmetric weight's stored values in the integer-dot form.
    pub fn implied_zero(&self) -> i32 {
        if self.layout.bits == 4 {
            8
        } else {
            0
        }
    }
    /// k steps per 64-byte chunk of the integer-dot form.
    pub fn chunk_k(&self) -> usize {
        if self.layout.bits == 4 {
            8
        } else {
            4
        }
    }
    pub fn record_bytes(&self) -> usize {
        self.header_bytes() + self.layout.block_size * self.row_bytes()
    }
    pub fn panel_bytes(&self) -> usize {
        self.layout.blocks() * self.record_bytes()
    }
    pub fn panels(&self) -> usize {
        self.layout.n.div_ceil(PANEL_COLS)
    }

    /// Repacks B (ONNX MatMulNBits layout), its scales and zero points. Columns past N are zero.
    pub fn pack(&self, b: &[u8], scales: &[f32], zp: Option<&[u8]>) -> Vec<u8> {
        let l = self.layout;
        let mut out = vec![0u8; self.panels() * self.panel_bytes()];
        for p in 0..self.panels() {
            for blk in 0..l.blocks() {
                let rec = p * self.panel_bytes() + blk * self.record_bytes();
                for c in 0..PANEL_COLS.min(l.n - p * PANEL_COLS) {
                    let col = p * PANEL_COLS + c;
                    let s = scales[col * l.blocks() + blk];
                    out[rec + 4 * c..rec + 4 * c + 4].copy_from_slice(&s.to_le_bytes());
                    let zero = l.zero(zp, blk, col);
                    if self.int_dot && self.asym {
                        // The zero point of the stored values as i32: int8 rows hold q - 128.
                        let z = if l.bits == 8 { zero as i32 - 128 } else { zero as i32 };
                        let o = rec + 64 + 4 * c;
                        out[o..o + 4].copy_from_slice(&z.to_le_bytes());
                    } else if self.asym {
                        let m = -(zero as f32) * s;
                        let o = rec + 64 + 4 * c;
                        out[o..o + 4].copy_from_slice(&m.to_le_bytes());
                    }
                    let rows = l.block_size.min(l.k - blk * l.block_size);
                    if self.act_correction() {
                        let za = self.act.map_or(0, |a| a.stored_zero());
                        let sum: i32 =
                            (0..rows).map(|j| l.q(b, blk * l.block_size + j, col) as i32 - zero as i32).sum();
                        let o = rec + self.act_correction_offset() + 4 * c;
                        out[o..o + 4].copy_from_slice(&(za * sum).to_le_bytes());
                    }
                    for j in 0..rows {
                        let q = l.q(b, blk * l.block_size + j, col);
                        if self.int_dot {
                            let (ck, kk) = (j / self.chunk_k(), j % self.chunk_k());
                            let o = rec + self.header_bytes() + ck * 64 + 4 * c + kk % 4;
                            if l.bits == 8 {
                                out[o] = q.wrapping_sub(128);
                            } else {
                                out[o] |= q << (4 * (kk / 4));
                            }
                            continue;
                        }
                        let row = rec + self.header_bytes() + j * self.row_bytes();
                        match (l.bits, self.asym) {
                            (8, false) => out[row + c] = q.wrapping_sub(zero),
                            (8, true) => out[row + c] = q,
                            _ => out[row + c % 8] |= q << (4 * (c / 8)),
                        }
                    }
                }
            }
        }
        out
    }
}

/// Columns per sparse panel: one f32x4 vector.
pub const SPARSE_COLS: usize = 4;

/// Largest ratio of sparse to dense packed bytes at which `SparsePanels` is chosen (`--sparse
/// auto`). A stored entry costs 20 bytes against 16 for a dense row of four columns, and an
/// index load plus an A load per vector fma instead of one load per four. `benches/sparse.sh`
/// at SmolLM2's MLP shapes: at 0.74 (80 % unstructured) the sparse kernel was 1.22-1.31x faster
/// for 1 and 32 rows, at 0.95 (70 %) 0.88-1.16x, so the line is drawn between them.
pub const SPARSE_MAX_BYTES_RATIO: f64 = 0.8;

/// A pruned f32 matmul weight in block-sparse form: columns in panels of four, and of each panel
/// only the k rows whose four values are not all zero, as entries (k, four floats).
///
/// Bytes: `starts`, panels + 1 u32 (entries before panel p), then `entries` u32 k indices, then
/// (16-byte aligned) `entries` rows of four f32. Unstructured pruning zeroes a four-wide row with
/// probability sparsity^4, so this pays only at high sparsity (2:4 along K never empties one).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SparsePanels {
    pub k: usize,
    pub n: usize,
    pub entries: usize,
}

impl SparsePanels {
    pub fn panels(&self) -> usize {
        self.n.div_ceil(SPARSE_COLS)
    }
    pub fn index_offset(&self) -> usize {
        4 * (self.panels() + 1)
    }
    pub fn values_offset(&self) -> usize {
        (self.index_offset() + 4 * self.entries).next_multiple_of(16)
    }
    pub fn bytes(&self) -> usize {
        self.values_offset() + 16 * self.entries
    }
    /// Bytes of the same weight as dense column panels (`pack_panels`).
    pub fn dense_bytes(&self) -> usize {
        self.n.div_ceil(PANEL_COLS) * PANEL_COLS * self.k * 4
    }

    /// Counts the entries of a K x N f32 matrix (element (k, n) at `k*ks + n*ns`). `None` when the
    /// indices would not fit the u32 fields.
    pub fn measure(src: &[u8], k: usize, n: usize, ks: usize, ns: usize) -> Option<SparsePanels> {
        let mut entries = 0usize;
        for p in 0..n.div_ceil(SPARSE_COLS) {
            entries += (0..k).filter(|&kk| !segment_is_zero(src, kk, p, n, ks, ns)).count();
        }
        let sp = SparsePanels { k, n, entries };
        (u32::try_from(k).is_ok() && u32::try_from(entries).is_ok()).then_some(sp)
    }

    /// Some four-column row is all zero (the form stores less than a dense one would).
    pub fn has_empty_rows(&self) -> bool {
        self.entries < self.k * self.panels()
    }

    /// The packed bytes (`measure` gave `self` for the same matrix).
    pub fn pack(&self, src: &[u8], ks: usize, ns: usize) -> Vec<u8> {
        let (k, n) = (self.k, self.n);
        let mut out = vec![0u8; self.bytes()];
        let (io, vo) = (self.index_offset(), self.values_offset());
        let mut e = 0usize;
        for p in 0..self.panels() {
            out[4 * p..4 * p + 4].copy_from_slice(&(e as u32).to_le_bytes());
            for kk in 0..k {
                if segment_is_zero(src, kk, p, n, ks, ns) {
                    continue;
                }
                out[io + 4 * e..io + 4 * e + 4].copy_from_slice(&(kk as u32).to_le_bytes());
                for c in 0..SPARSE_COLS.min(n - p * SPARSE_COLS) {
                    let s = (kk * ks + (p * SPARSE_COLS + c) * ns) * 4;
                    let d = vo + 16 * e + 4 * c;
                    out[d..d + 4].copy_from_slice(&src[s..s + 4]);
                }
                e += 1;
            }
        }
        let p = self.panels();
        out[4 * p..4 * p + 4].copy_from_slice(&(e as u32).to_le_bytes());
        debug_assert_eq!(e, self.entries);
        out
    }
}

/// A pruned matmul weight in block-sparse form: one `SparsePanels`, or for a SwiGLU weight [K, 2N]
/// the gate half's and then, from byte `up_offset`, the up half's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SparseWeight {
    pub gate: SparsePanels,
    pub up: Option<SparsePanels>,
}

impl SparseWeight {
    pub fn bytes(&self) -> usize {
        self.up_offset() + self.up.map_or(0, |u| u.bytes())
    }
    /// Where the up half starts (16-byte aligned: `SparsePanels::bytes` is a multiple of 16).
    pub fn up_offset(&self) -> usize {
        self.gate.bytes()
    }
    pub fn dense_bytes(&self) -> usize {
        self.gate.dense_bytes() + self.up.map_or(0, |u| u.dense_bytes())
    }
    /// Whether the block-sparse kernel is expected to beat the dense one (`SPARSE_MAX_BYTES_RATIO`).
    pub fn pays(&self) -> bool {
        (self.bytes() as f64) <= SPARSE_MAX_BYTES_RATIO * self.dense_bytes() as f64
    }
    pub fn has_empty_rows(&self) -> bool {
        self.gate.has_empty_rows() || self.up.is_some_and(|u| u.has_empty_rows())
    }
}

/// Row `kk` of sparse panel `p` holds only zeros (±0.0; a NaN counts as a value).
fn segment_is_zero(src: &[u8], kk: usize, p: usize, n: usize, ks: usize, ns: usize) -> bool {
    (0..SPARSE_COLS.min(n - p * SPARSE_COLS)).all(|c| {
        let s = (kk * ks + (p * SPARSE_COLS + c) * ns) * 4;
        f32::from_le_bytes(src[s..s + 4].try_into().unwrap()) == 0.0
    })
}

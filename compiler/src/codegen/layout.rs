//! Weight layouts chosen at compile time, so the device does no repacking at load.
//!
//! f32 matmul weights: column panels of 16 floats per k step (`pack_panels`).
//! Quantized weights (`Op::MatMulNBits`): the same 16-column panels, each split into the blocks
//! along K, every block a record of its 16 scales (and, with zero points, 16 offsets `-zero *
//! scale`) followed by its rows of 16 quantized values, so a kernel streams one panel front to
//! back and dequantizes in registers (`NBitsPacking`).

use crate::ir::nbits::NBitsLayout;

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
}

impl NBitsPacking {
    pub fn row_bytes(&self) -> usize {
        PANEL_COLS * self.layout.bits / 8
    }
    pub fn header_bytes(&self) -> usize {
        PANEL_COLS * 4 * if self.asym { 2 } else { 1 }
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
                    if self.asym {
                        let m = -(zero as f32) * s;
                        let o = rec + 64 + 4 * c;
                        out[o..o + 4].copy_from_slice(&m.to_le_bytes());
                    }
                    let rows = l.block_size.min(l.k - blk * l.block_size);
                    for j in 0..rows {
                        let q = l.q(b, blk * l.block_size + j, col);
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

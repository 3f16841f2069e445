//! Register tiles per target: how many output rows and columns each kernel family keeps in vector
//! registers across its k loop (the kernel half of layout selection; the packed weight layouts,
//! 16-column panels, are in `layout`). One place sizes them from the target's register file, so
//! kernels stay shape-generic.
//!
//! Budgets (accumulators + B vectors + broadcast A must fit the vector registers). Loop counts
//! below are from `benches/tile_loops.sh` (the generated code's hot loop bodies), before from
//! objdump of the previous code:
//! - x86_64: 16 xmm, and FMA3 ties its result to a multiplicand, so Cranelift copies the broadcast
//!   A per product. f32: 6 rows x 2 vectors (12 + 2 + 1); against 4 rows, `benches/kernels.sh`
//!   shapes (min of 300 runs) 32x576 @ 576x1536 went from 1.86 to 1.74 ms and 128x1536 @
//!   1536x576 from 8.2 to 7.8 ms. Two k steps per loop iteration halve the loop's accumulator
//!   copies at the back edge (the fma results rotate through the registers): min ms of 4-6
//!   alternating rounds, 32x576 @ 576x1536 1.74 -> 1.58, 32x1536 @ 1536x576 1.88 -> 1.76 / 1.90 ->
//!   1.80, 128x576 @ 576x1536 7.18 -> 6.36 / 7.43 -> 6.76, 128x1536 @ 1536x576 7.70 -> 7.35; four
//!   steps were no better. Weight-only tiles likewise (int4 versions of the same shapes, medians
//!   of 5 alternating rounds 6-11 % lower, mins 1-4 %).
//! - aarch64: 32 v registers; `fmla` (by element) accumulates in place. f32: 6 rows x 4 vectors
//!   (24 + 4 + the A scalar), one tile per 16-column panel: 40 instructions per 24 fmla, no
//!   spills (4 x 2 before: 20 per 8). 7 x 4 spills.
//! - riscv64 with V: 32 v registers; `vfmacc.vf` takes A from an f register. f32: 6 x 4 as on
//!   aarch64 (39-40 instructions per 24 vfmacc, no spills; 7 x 4 spills).
//!
//! Integer-dot tiles (int8 activations): rows of activations per unpacked chunk of weights.
//! Per row they need 4 accumulators (16 columns) and the row's activation splats; the chunk's 8
//! unpacked 4-bit vectors are shared. aarch64 with SDOT: 4 rows, 70 instructions per 32 sdot and
//! no spills (one row: 34 per 8). x86_64: 2 rows (pmaddubsw's i16 sums): 339 instructions per 72
//! pmaddubsw/pmaddwd with 83 stack accesses (one row: 162 per 36, none), yet faster: min ms of 5
//! alternating rounds, w4a8 versions of the `kernels.sh` shapes, 128x576 @ 576x1536 4.24 -> 3.72,
//! 128x1536 @ 1536x576 4.95 -> 4.40, 32x576 @ 576x1536 1.08 -> 0.95, 32x1536 @ 1536x576 1.20 ->
//! 1.06. Elsewhere the widening dot tree needs temporaries: 2 rows.
//!
//! Weight-only tiles (f32 activations, weights dequantized per k step): 4 rows by 8 columns on
//! x86_64; by the whole 16-column panel on aarch64 and riscv64 (16 accumulators, 4 scales, 4
//! dequantized vectors): 44-46 instructions per 16 multiply-adds, no spills, against 2 x 29 for
//! two 8-column tiles; on x86_64 it spills.

use super::target::Target;
use edgec_runtime::Arch;

/// K-blocking: `K_BLOCK` k steps per block, for K above `K_BLOCKED_FROM`, so a block of each
/// weight panel (32 KB) and of A's rows stays in cache while every tile passes. Measured on
/// x86_64 with `benches/kernels.py`'s models (N = 256, 1 thread, min ms of 4 and of 8 alternating
/// rounds): K = 8192 went 5.86 / 5.69 -> 5.36 / 5.38 ms (M = 32) and 23.0 / 22.9 -> 20.3 / 22.2 ms
/// (M = 128); K = 1536 did not change (0.904 / 0.900, 3.37 / 3.50 ms), so the 135M model's
/// K <= 1536 stays whole. Medians on this VM vary more than these gains.
const K_BLOCK: usize = 512;
const K_BLOCKED_FROM: usize = 2048;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tiles {
    /// f32 matmul: rows of A per register tile (prompts; a single row is one 1 x 16 tile).
    pub f32_rows: usize,
    /// f32 matmul: f32x4 vectors of columns per tile (1, 2 or 4: a 16-column panel holds 4).
    pub f32_vectors: usize,
    /// k steps per loop iteration of a multi-row float tile (f32 and weight-only).
    pub k_unroll: usize,
    /// MatMulNBits with int8 activations: rows per tile sharing each unpacked chunk.
    pub int_dot_rows: usize,
    /// MatMulNBits with f32 activations (weight-only): columns per 4-row prompt tile, 8 (half a
    /// panel) or 16.
    pub nbits_cols: usize,
    /// f32 matmul with a packed weight: k steps per K block, when K is over `k_blocked_from`.
    pub k_block: usize,
    pub k_blocked_from: usize,
}

impl Tiles {
    pub fn for_target(target: &Target) -> Tiles {
        match target.arch {
            Arch::X86_64 => Tiles {
                f32_rows: 6,
                f32_vectors: 2,
                k_unroll: 2,
                int_dot_rows: 2,
                nbits_cols: 8,
                k_block: K_BLOCK,
                k_blocked_from: K_BLOCKED_FROM,
            },
            Arch::Aarch64 => Tiles {
                f32_rows: 6,
                f32_vectors: 4,
                k_unroll: 1,
                int_dot_rows: if target.has("dotprod") { 4 } else { 2 },
                nbits_cols: 16,
                k_block: K_BLOCK,
                k_blocked_from: K_BLOCKED_FROM,
            },
            Arch::Riscv64 => Tiles {
                f32_rows: 6,
                f32_vectors: 4,
                k_unroll: 1,
                int_dot_rows: 2,
                nbits_cols: 16,
                k_block: K_BLOCK,
                k_blocked_from: K_BLOCKED_FROM,
            },
        }
    }
}

//! What this CPU is and has, and mapping CODE executable.

use memmap2::{Mmap, MmapMut};

use crate::artifact::LoadError;
use crate::format::Arch;

/// Refuses an artifact for another architecture or one needing features this CPU lacks.
pub fn check_host(arch: Arch, required: u64) -> Result<(), LoadError> {
    if Arch::host() != Some(arch) {
        return Err(LoadError::WrongArch { artifact: arch.name().into(), host: std::env::consts::ARCH.into() });
    }
    check_features(arch, required, host_feature_bits())
}

/// `available` is a bit set in the artifact's numbering (see `host_feature_bits`).
pub fn check_features(arch: Arch, required: u64, available: u64) -> Result<(), LoadError> {
    let missing = required & !available;
    if missing != 0 {
        return Err(LoadError::MissingFeatures { arch: arch.name(), missing: arch.feature_list(missing) });
    }
    Ok(())
}

fn bits(flags: &[bool]) -> u64 {
    flags.iter().enumerate().filter(|(_, on)| **on).fold(0, |acc, (i, _)| acc | 1 << i)
}

/// This CPU's features in the bit numbering of its architecture's table (0 elsewhere).
pub fn host_feature_bits() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        bits(&[
            has!("sse3"),
            has!("ssse3"),
            has!("sse4.1"),
            has!("sse4.2"),
            has!("popcnt"),
            has!("avx"),
            has!("avx2"),
            has!("fma"),
            has!("bmi1"),
            has!("bmi2"),
            has!("lzcnt"),
        ])
    }
    #[cfg(target_arch = "aarch64")]
    {
        use std::arch::is_aarch64_feature_detected as has;
        bits(&[has!("neon"), has!("dotprod"), has!("i8mm"), has!("fp16")])
    }
    #[cfg(target_arch = "riscv64")]
    {
        use std::arch::is_riscv_feature_detected as has;
        bits(&[has!("v"), has!("zba"), has!("zbb")])
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "riscv64")))]
    {
        bits(&[])
    }
}

/// Copies CODE into a fresh anonymous mapping, then flips it from read+write to read+execute:
/// it is never writable and executable at once.
pub fn map_code(code: &[u8]) -> Result<Mmap, LoadError> {
    let mut map = MmapMut::map_anon(code.len()).map_err(LoadError::CodeMap)?;
    map.copy_from_slice(code);
    sync_icache(&map);
    map.make_exec().map_err(LoadError::CodeMap)
}

/// aarch64 does not keep instruction and data caches coherent: clean the written lines to the
/// point of unification and invalidate them in the instruction cache (as `__clear_cache` does).
#[cfg(target_arch = "aarch64")]
fn sync_icache(code: &[u8]) {
    use std::arch::asm;
    let ctr: u64;
    // SAFETY: CTR_EL0 is readable from user space on Linux and macOS.
    unsafe { asm!("mrs {}, ctr_el0", out(reg) ctr, options(nomem, nostack, preserves_flags)) };
    let dline = 4usize << ((ctr >> 16) & 0xf);
    let iline = 4usize << (ctr & 0xf);
    let (start, end) = (code.as_ptr() as usize, code.as_ptr() as usize + code.len());
    let mut a = start & !(dline - 1);
    while a < end {
        // SAFETY: cache maintenance on addresses of our own mapping.
        unsafe { asm!("dc cvau, {}", in(reg) a, options(nostack, preserves_flags)) };
        a += dline;
    }
    unsafe { asm!("dsb ish", options(nostack, preserves_flags)) };
    let mut a = start & !(iline - 1);
    while a < end {
        unsafe { asm!("ic ivau, {}", in(reg) a, options(nostack, preserves_flags)) };
        a += iline;
    }
    unsafe { asm!("dsb ish", "isb", options(nostack, preserves_flags)) };
}

/// x86_64 keeps the caches coherent; on riscv64 Linux the kernel flushes the instruction cache
/// when a page becomes executable.
#[cfg(not(target_arch = "aarch64"))]
fn sync_icache(_code: &[u8]) {}

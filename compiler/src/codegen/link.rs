//! A minimal linker: lays the compiled functions out in one code blob and resolves the calls
//! between them, so the artifact's code needs no relocations at load time.

use cranelift_codegen::binemit::Reloc;

use crate::error::{Error, Result};

/// A call from one generated function to another, to patch at link time.
pub struct Fixup {
    /// Byte offset inside the calling function.
    pub at: u32,
    pub kind: Reloc,
    /// Index of the callee function.
    pub callee: usize,
    pub addend: i64,
}

pub struct CompiledFunc {
    pub code: Vec<u8>,
    pub fixups: Vec<Fixup>,
    pub alignment: u32,
}

/// Concatenates the functions and patches every call between them. Returns the blob and each
/// function's offset.
pub fn link(funcs: &[CompiledFunc]) -> Result<(Vec<u8>, Vec<u64>)> {
    let mut blob = Vec::new();
    let mut offsets = Vec::with_capacity(funcs.len());
    for f in funcs {
        let align = f.alignment.max(16) as usize;
        blob.resize(blob.len().next_multiple_of(align), 0);
        offsets.push(blob.len() as u64);
        blob.extend_from_slice(&f.code);
    }
    for (f, &base) in funcs.iter().zip(&offsets) {
        for fx in &f.fixups {
            let target =
                *offsets.get(fx.callee).ok_or_else(|| Error::Invalid("internal: call to unknown function".into()))?;
            patch(&mut blob, fx.kind, base + fx.at as u64, target, fx.addend)?;
        }
    }
    Ok((blob, offsets))
}

/// Writes one PC-relative call/branch fixup at `at` (offset in `blob`) to `target`.
pub fn patch(blob: &mut [u8], kind: Reloc, at: u64, target: u64, addend: i64) -> Result<()> {
    let p = at as i64;
    let s = target as i64;
    let at = at as usize;
    let rd32 = |b: &[u8]| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    match kind {
        Reloc::X86CallPCRel4 | Reloc::X86CallPLTRel4 | Reloc::X86PCRel4 => {
            let v = s + addend - p;
            let v = i32::try_from(v).map_err(|_| Error::Invalid("code too large for a rel32 call".into()))?;
            blob[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        Reloc::Arm64Call => {
            let v = (s + addend - p) >> 2;
            if !(-(1 << 25)..(1 << 25)).contains(&v) {
                return Err(Error::Invalid("code too large for an aarch64 bl".into()));
            }
            let insn = (rd32(blob) & !0x03ff_ffff) | (v as u32 & 0x03ff_ffff);
            blob[at..at + 4].copy_from_slice(&insn.to_le_bytes());
        }
        Reloc::RiscvCallPlt => {
            // auipc ra, hi20 ; jalr ra, lo12(ra)
            let v = s + addend - p;
            let v = i32::try_from(v).map_err(|_| Error::Invalid("code too large for a riscv call".into()))?;
            let hi = (v.wrapping_add(0x800) as u32) & 0xffff_f000;
            let lo = (v as u32) & 0xfff;
            let auipc = (rd32(blob) & 0xfff) | hi;
            blob[at..at + 4].copy_from_slice(&auipc.to_le_bytes());
            let jalr = u32::from_le_bytes(blob[at + 4..at + 8].try_into().unwrap());
            let jalr = (jalr & 0x000f_ffff) | (lo << 20);
            blob[at + 4..at + 8].copy_from_slice(&jalr.to_le_bytes());
        }
        k => return Err(Error::Invalid(format!("internal: unsupported relocation {k:?} in generated code"))),
    }
    Ok(())
}

//! A minimal linker: lays the compiled functions out in one code blob and resolves the calls
//! between them, so the artifact's code needs no relocations at load time.

use cranelift_codegen::binemit::Reloc;

use crate::error::{Error, Result};

/// What a fixup refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FixTarget {
    /// Function number `i` (a call or a function address).
    Func(usize),
    /// An offset in the same function (riscv64's lo12 half points at its auipc).
    Local(u32),
}

/// A reference from one generated function to another, to patch at link time.
pub struct Fixup {
    /// Byte offset inside the referring function.
    pub at: u32,
    pub kind: Reloc,
    pub target: FixTarget,
    pub addend: i64,
}

pub struct CompiledFunc {
    pub code: Vec<u8>,
    pub fixups: Vec<Fixup>,
    pub alignment: u32,
    /// Cranelift's listing of the machine instructions (with `Options::listing`).
    pub listing: Option<String>,
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
    let func_addr = |i: usize| -> Result<u64> {
        offsets.get(i).copied().ok_or_else(|| Error::Invalid("internal: reference to an unknown function".into()))
    };
    for (f, &base) in funcs.iter().zip(&offsets) {
        for fx in &f.fixups {
            match fx.target {
                FixTarget::Func(i) => patch(&mut blob, fx.kind, base + fx.at as u64, func_addr(i)?, fx.addend)?,
                FixTarget::Local(auipc) => {
                    // riscv64 `addi rd, rd, %pcrel_lo(label)`: the low half of the value the hi20
                    // fixup at `label` computed.
                    let hi = f
                        .fixups
                        .iter()
                        .find(|h| h.at == auipc && h.kind == Reloc::RiscvPCRelHi20)
                        .ok_or_else(|| Error::Invalid("internal: pcrel_lo without its auipc".into()))?;
                    let FixTarget::Func(i) = hi.target else {
                        return Err(Error::Invalid("internal: pcrel_hi to a local label".into()));
                    };
                    let p = (base + auipc as u64) as i64;
                    let v = func_addr(i)? as i64 + hi.addend - p;
                    let at = (base + fx.at as u64) as usize;
                    let lo = (v as u32) & 0xfff;
                    let insn = u32::from_le_bytes(blob[at..at + 4].try_into().unwrap());
                    let insn = (insn & 0x000f_ffff) | (lo << 20);
                    blob[at..at + 4].copy_from_slice(&insn.to_le_bytes());
                }
            }
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
        Reloc::Aarch64AdrPrelPgHi21 => {
            // adrp: 4 KiB page delta (the code is mapped page-aligned), immlo/immhi fields.
            let pages = ((s + addend) >> 12) - (p >> 12);
            if !(-(1 << 20)..(1 << 20)).contains(&pages) {
                return Err(Error::Invalid("code too large for adrp".into()));
            }
            let imm = pages as u32 & 0x1f_ffff;
            let insn = (rd32(blob) & !((0x3 << 29) | (0x7_ffff << 5))) | ((imm & 0x3) << 29) | ((imm >> 2) << 5);
            blob[at..at + 4].copy_from_slice(&insn.to_le_bytes());
        }
        Reloc::Aarch64AddAbsLo12Nc => {
            let lo = ((s + addend) & 0xfff) as u32;
            let insn = (rd32(blob) & !(0xfff << 10)) | (lo << 10);
            blob[at..at + 4].copy_from_slice(&insn.to_le_bytes());
        }
        Reloc::RiscvPCRelHi20 => {
            let v = i32::try_from(s + addend - p).map_err(|_| Error::Invalid("code too large for auipc".into()))?;
            let hi = (v.wrapping_add(0x800) as u32) & 0xffff_f000;
            let insn = (rd32(blob) & 0xfff) | hi;
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

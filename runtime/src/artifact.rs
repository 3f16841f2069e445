//! The one artifact reader every tool shares. It trusts nothing until it has checked it: the
//! fixed header first, then the header checksum, then the section table, padding, section
//! checksums, and finally the META schema.

use std::collections::{HashMap, HashSet};
use std::io;
use std::ops::Range;
use std::path::PathBuf;

use crate::format::{
    header_len, sha256, Arch, Meta, SectionKind, FIXED_HEADER_LEN, HASH_LEN, MAGIC, MAX_ARENA_BYTES, MAX_SECTIONS,
    SECTION_ALIGN, SECTION_ENTRY_LEN, TRIPLE_LEN, VERSION,
};

/// Why an artifact was refused. Every message names the field or section at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("file is {len} bytes, too short for the {what} (needs {needed})")]
    Truncated { what: &'static str, needed: u64, len: u64 },
    #[error("magic: not an edgec artifact")]
    Magic,
    #[error("format version {0}: made by a newer edgec (this runtime reads version {VERSION}); update the runtime or recompile")]
    NewerVersion(u32),
    #[error("format version {0}: invalid (this runtime reads version {VERSION})")]
    BadVersion(u32),
    #[error("section count {0}: must be 1..={MAX_SECTIONS}")]
    SectionCount(u32),
    #[error("header length {found}: {sections} sections need {expected}")]
    HeaderLength { found: u32, expected: usize, sections: u32 },
    #[error("header checksum mismatch: the header is corrupt")]
    HeaderChecksum,
    #[error("reserved header field is {0}, must be 0")]
    Reserved(u32),
    #[error("target triple: {0}")]
    Triple(String),
    #[error("required CPU features: {0}")]
    Features(String),
    #[error("section table entry {index}: {reason}")]
    SectionEntry { index: usize, reason: String },
    #[error("{kind} section: {reason}")]
    Section { kind: SectionKind, reason: String },
    #[error("{0} section is missing")]
    MissingSection(SectionKind),
    #[error("{0} section checksum mismatch: the section is corrupt")]
    SectionChecksum(SectionKind),
    #[error("padding: non-zero byte at offset {0} (bytes outside the header and sections must be 0)")]
    Padding(u64),
    #[error("META {field}: {reason}")]
    Meta { field: String, reason: String },
    #[error("target triple: the artifact is for {artifact}, this CPU is {host}")]
    WrongArch { artifact: String, host: String },
    #[error("required CPU features: this {arch} CPU lacks {}", missing.join(", "))]
    MissingFeatures { arch: &'static str, missing: Vec<String> },
    #[error("WEIGHTS section: mapped at an address that is not 64-byte aligned")]
    WeightsAlignment,
    #[error("CODE section: cannot map it executable: {0}")]
    CodeMap(io::Error),
    #[error("META arena_bytes: cannot allocate {0} bytes")]
    Arena(u64),
}

fn meta_err(field: impl Into<String>, reason: impl Into<String>) -> LoadError {
    LoadError::Meta { field: field.into(), reason: reason.into() }
}

/// One section table entry, after validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SectionEntry {
    pub kind: SectionKind,
    pub offset: u64,
    pub len: u64,
    pub sha256: [u8; 32],
}

impl SectionEntry {
    /// Byte range in the file; fits in usize because it was checked against the file's length.
    pub fn range(&self) -> Range<usize> {
        self.offset as usize..(self.offset + self.len) as usize
    }
}

/// A fully validated artifact, borrowing CODE and WEIGHTS from the file bytes.
#[derive(Clone, Debug)]
pub struct Artifact<'a> {
    pub version: u32,
    pub triple: String,
    pub arch: Arch,
    pub features: u64,
    pub header_sha256: [u8; 32],
    /// In table order.
    pub sections: Vec<SectionEntry>,
    pub meta: Meta,
    pub code: &'a [u8],
    pub weights: &'a [u8],
    /// The TOKENIZER section (UTF-8 JSON), when present.
    pub tokenizer: Option<&'a str>,
}

impl<'a> Artifact<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Artifact<'a>, LoadError> {
        need(bytes, MAGIC.len(), "magic")?;
        if bytes[..MAGIC.len()] != MAGIC {
            return Err(LoadError::Magic);
        }
        need(bytes, 12, "format version")?;
        let version = u32_at(bytes, 8);
        if version > VERSION {
            return Err(LoadError::NewerVersion(version));
        } else if version != VERSION {
            return Err(LoadError::BadVersion(version));
        }
        need(bytes, FIXED_HEADER_LEN, "header")?;
        let count = u32_at(bytes, 88);
        if !(1..=MAX_SECTIONS).contains(&count) {
            return Err(LoadError::SectionCount(count));
        }
        let hlen = header_len(count as usize);
        let found = u32_at(bytes, 12);
        if found as usize != hlen {
            return Err(LoadError::HeaderLength { found, expected: hlen, sections: count });
        }
        need(bytes, hlen, "section table and header checksum")?;
        let table_end = hlen - HASH_LEN;
        let header_sha256 = sha256(&bytes[..table_end]);
        if bytes[table_end..hlen] != header_sha256 {
            return Err(LoadError::HeaderChecksum);
        }

        // The header is intact; now check what it says.
        let reserved = u32_at(bytes, 92);
        if reserved != 0 {
            return Err(LoadError::Reserved(reserved));
        }
        let triple = parse_triple(&bytes[16..16 + TRIPLE_LEN])?;
        let features = u64_at(bytes, 80);
        let arch = check_target(&triple, features)?;
        let sections = parse_table(bytes, count as usize)?;
        check_padding(bytes, hlen, &sections)?;
        for s in &sections {
            if sha256(&bytes[s.range()]) != s.sha256 {
                return Err(LoadError::SectionChecksum(s.kind));
            }
        }
        let slice = |kind| sections.iter().find(|s| s.kind == kind).map(|s| &bytes[s.range()]).unwrap_or(&[]);
        let (meta_bytes, code, weights) =
            (slice(SectionKind::Meta), slice(SectionKind::Code), slice(SectionKind::Weights));
        let text =
            std::str::from_utf8(meta_bytes).map_err(|e| meta_err("section", format!("not valid UTF-8 ({e})")))?;
        let meta: Meta = serde_json::from_str(text).map_err(|e| meta_err("JSON", e.to_string()))?;
        validate_meta(&meta, code.len() as u64)?;
        let tokenizer = match sections.iter().find(|s| s.kind == SectionKind::Tokenizer) {
            Some(s) => Some(std::str::from_utf8(&bytes[s.range()]).map_err(|e| LoadError::Section {
                kind: SectionKind::Tokenizer,
                reason: format!("not valid UTF-8 ({e})"),
            })?),
            None => None,
        };
        Ok(Artifact { version, triple, arch, features, header_sha256, sections, meta, code, weights, tokenizer })
    }

    pub fn section(&self, kind: SectionKind) -> Option<&SectionEntry> {
        self.sections.iter().find(|s| s.kind == kind)
    }
}

fn need(bytes: &[u8], needed: usize, what: &'static str) -> Result<(), LoadError> {
    if bytes.len() < needed {
        return Err(LoadError::Truncated { what, needed: needed as u64, len: bytes.len() as u64 });
    }
    Ok(())
}

// Callers have checked the length with `need` first.
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

/// The NUL-padded triple field: text first, then only NULs.
fn parse_triple(field: &[u8]) -> Result<String, LoadError> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    if field[end..].iter().any(|&b| b != 0) {
        return Err(LoadError::Triple("padding after the first NUL is not all NUL".into()));
    }
    let text = std::str::from_utf8(&field[..end]).map_err(|e| LoadError::Triple(format!("not UTF-8 ({e})")))?;
    Ok(text.to_string())
}

/// Checks a triple and its feature bits; shared with the writer. Unknown bits are refused:
/// they mean a newer compiler or corruption, and either way the CPU check could not be trusted.
pub(crate) fn check_target(triple: &str, features: u64) -> Result<Arch, LoadError> {
    if triple.is_empty() || triple.len() > TRIPLE_LEN {
        return Err(LoadError::Triple(format!("length {} is not 1..={TRIPLE_LEN}", triple.len())));
    }
    if !triple.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(LoadError::Triple(format!("{triple:?} has characters other than printable ASCII")));
    }
    let arch = Arch::from_triple(triple)
        .ok_or_else(|| LoadError::Triple(format!("{triple:?}: unsupported architecture (x86_64, aarch64, riscv64)")))?;
    let unknown = features & !arch.known_bits();
    if unknown != 0 {
        let bits = arch.feature_list(unknown).join(", ");
        return Err(LoadError::Features(format!("{bits} undefined for {} (made by a newer edgec?)", arch.name())));
    }
    let mandatory = arch.mandatory_bits() & !features;
    if mandatory != 0 {
        let bits = arch.feature_list(mandatory).join(", ");
        return Err(LoadError::Features(format!("{bits} must always be set for {}", arch.name())));
    }
    Ok(arch)
}

fn parse_table(bytes: &[u8], count: usize) -> Result<Vec<SectionEntry>, LoadError> {
    let file_len = bytes.len() as u64;
    let hlen = header_len(count) as u64;
    let mut sections: Vec<SectionEntry> = Vec::with_capacity(count);
    for index in 0..count {
        let at = FIXED_HEADER_LEN + index * SECTION_ENTRY_LEN;
        let raw_kind = u32_at(bytes, at);
        let kind = SectionKind::from_u32(raw_kind)
            .ok_or_else(|| LoadError::SectionEntry { index, reason: format!("unknown section kind {raw_kind}") })?;
        let bad = |reason: String| LoadError::Section { kind, reason };
        let flags = u32_at(bytes, at + 4);
        let offset = u64_at(bytes, at + 8);
        let len = u64_at(bytes, at + 16);
        if flags != 0 {
            return Err(bad(format!("flags {flags:#x}, must be 0")));
        }
        if !offset.is_multiple_of(SECTION_ALIGN) {
            return Err(bad(format!("offset {offset} is not a multiple of {SECTION_ALIGN}")));
        }
        if offset < hlen {
            return Err(bad(format!("offset {offset} is inside the {hlen}-byte header")));
        }
        let end = offset.checked_add(len).ok_or_else(|| bad(format!("offset {offset} + length {len} overflows")))?;
        if end > file_len {
            return Err(bad(format!("bytes {offset}..{end} lie outside the {file_len}-byte file")));
        }
        if sections.iter().any(|s| s.kind == kind) {
            return Err(bad("appears more than once".into()));
        }
        let mut sha = [0u8; 32];
        sha.copy_from_slice(&bytes[at + 24..at + 56]);
        sections.push(SectionEntry { kind, offset, len, sha256: sha });
    }
    if let Some(kind) = SectionKind::REQUIRED.into_iter().find(|k| sections.iter().all(|s| s.kind != *k)) {
        return Err(LoadError::MissingSection(kind));
    }
    let mut by_offset: Vec<&SectionEntry> = sections.iter().collect();
    by_offset.sort_by_key(|s| (s.offset, s.len));
    for pair in by_offset.windows(2) {
        if pair[0].offset + pair[0].len > pair[1].offset {
            let reason = format!("overlaps the {} section", pair[0].kind);
            return Err(LoadError::Section { kind: pair[1].kind, reason });
        }
    }
    Ok(sections)
}

/// Every byte outside the header and the sections must be zero.
fn check_padding(bytes: &[u8], hlen: usize, sections: &[SectionEntry]) -> Result<(), LoadError> {
    let mut ranges: Vec<Range<usize>> = sections.iter().map(SectionEntry::range).collect();
    ranges.sort_by_key(|r| r.start);
    let mut pos = hlen;
    for r in ranges.iter().chain(std::iter::once(&(bytes.len()..bytes.len()))) {
        if let Some(i) = bytes[pos..r.start].iter().position(|&b| b != 0) {
            return Err(LoadError::Padding((pos + i) as u64));
        }
        pos = r.end;
    }
    Ok(())
}

/// Checks META against the schema rules the JSON types cannot express; shared with the writer.
pub(crate) fn validate_meta(meta: &Meta, code_len: u64) -> Result<(), LoadError> {
    if meta.arena_bytes >= MAX_ARENA_BYTES {
        return Err(meta_err("arena_bytes", format!("{} is not below 2^40", meta.arena_bytes)));
    }
    if meta.entry_offset >= code_len {
        let reason = format!("{} is not inside the {code_len}-byte CODE section", meta.entry_offset);
        return Err(meta_err("entry_offset", reason));
    }
    let mut declared = HashMap::new();
    for (i, s) in meta.symbols.iter().enumerate() {
        check_name(&format!("symbols[{i}].name"), &s.name)?;
        if declared.insert(s.name.as_str(), i).is_some() {
            return Err(meta_err(format!("symbols[{i}].name"), format!("`{}` is declared twice", s.name)));
        }
        if s.max == 0 || s.max > i64::MAX as u64 {
            return Err(meta_err(format!("symbols[{i}].max"), format!("{} is not 1..=i64::MAX", s.max)));
        }
    }
    let mut bound = HashSet::new();
    for (list, tensors) in [("inputs", &meta.inputs), ("outputs", &meta.outputs)] {
        let mut names = HashSet::new();
        for (i, t) in tensors.iter().enumerate() {
            check_name(&format!("{list}[{i}].name"), &t.name)?;
            if !names.insert(t.name.as_str()) {
                return Err(meta_err(format!("{list}[{i}].name"), format!("`{}` appears twice", t.name)));
            }
            for (axis, dim) in t.shape.iter().enumerate() {
                let field = || format!("{list}[{i}].shape[{axis}]");
                if let Some(name) = dim.symbols().find(|n| !declared.contains_key(n)) {
                    return Err(meta_err(field(), format!("symbol `{name}` is not declared in `symbols`")));
                }
                if list == "inputs" {
                    if let Some(name) = dim.as_symbol() {
                        bound.insert(name);
                    } else if dim.as_constant().is_none_or(|c| c < 0) {
                        let reason = format!("`{dim}` is neither a constant nor a single symbol");
                        return Err(meta_err(field(), reason));
                    }
                }
            }
        }
    }
    // The runtime learns symbol values only from input shapes.
    if let Some((i, s)) = meta.symbols.iter().enumerate().find(|(_, s)| !bound.contains(s.name.as_str())) {
        let reason = format!("`{}` is not the dimension of any input, so it cannot be bound", s.name);
        return Err(meta_err(format!("symbols[{i}]"), reason));
    }
    for (i, r) in meta.requires.iter().enumerate() {
        check_name(&format!("requires[{i}].what"), &r.what)?;
        if let Some(name) = r.dim.symbols().find(|n| !declared.contains_key(n)) {
            return Err(meta_err(
                format!("requires[{i}].dim"),
                format!("symbol `{name}` is not declared in `symbols`"),
            ));
        }
    }
    let (mut ins, mut outs) = (HashSet::new(), HashSet::new());
    for (i, slot) in meta.kv_cache.iter().enumerate() {
        let err = |reason: String| meta_err(format!("kv_cache[{i}]"), reason);
        let (Some(input), Some(output)) = (meta.inputs.get(slot.input), meta.outputs.get(slot.output)) else {
            return Err(err(format!("input {} or output {} does not exist", slot.input, slot.output)));
        };
        if !ins.insert(slot.input) || !outs.insert(slot.output) {
            return Err(err("an input or output is named by two slots".into()));
        }
        if input.dtype != output.dtype || input.shape.len() != output.shape.len() || slot.axis >= input.shape.len() {
            return Err(err(format!(
                "`{}` and `{}` differ in dtype or rank, or axis {} is out of range",
                input.name, output.name, slot.axis
            )));
        }
        // A stateful run knows the past length; every other dim must follow from the other inputs.
        if input.shape[slot.axis].as_symbol().is_none()
            || (0..input.shape.len()).any(|a| a != slot.axis && input.shape[a] != output.shape[a])
        {
            return Err(err(format!(
                "`{}` must be `{}` grown along axis {} of a symbolic length",
                output.name, input.name, slot.axis
            )));
        }
        if slot.capacity == 0 || slot.capacity > i64::MAX as u64 {
            return Err(err(format!("capacity {} is not 1..=i64::MAX", slot.capacity)));
        }
    }
    Ok(())
}

/// Names cross the C API as NUL-terminated strings.
fn check_name(field: &str, name: &str) -> Result<(), LoadError> {
    if name.is_empty() || name.contains('\0') {
        return Err(meta_err(field, format!("{name:?} is empty or contains NUL")));
    }
    Ok(())
}

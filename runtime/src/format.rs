//! The `.edgec` artifact format (docs/artifact-format.md): constants, the feature-bit tables,
//! the META schema, and the writer the compiler uses.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::io::{self, Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::artifact::{check_target, validate_meta, LoadError};

pub const MAGIC: [u8; 8] = *b"EDGEC\0AF";
pub const VERSION: u32 = 1;
/// Bytes before the section table.
pub const FIXED_HEADER_LEN: usize = 96;
pub const SECTION_ENTRY_LEN: usize = 56;
pub const HASH_LEN: usize = 32;
pub const TRIPLE_LEN: usize = 64;
pub const MAX_SECTIONS: u32 = 16;
pub const SECTION_ALIGN: u64 = 64;
/// `arena_bytes` must be below this (1 TiB): anything larger is corruption, not a plan.
pub const MAX_ARENA_BYTES: u64 = 1 << 40;

/// Header length for `sections` table entries, including the trailing header checksum.
pub const fn header_len(sections: usize) -> usize {
    FIXED_HEADER_LEN + sections * SECTION_ENTRY_LEN + HASH_LEN
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn align_up(v: u64) -> u64 {
    v.div_ceil(SECTION_ALIGN) * SECTION_ALIGN
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SectionKind {
    Meta = 1,
    Code = 2,
    Weights = 3,
    /// Optional: a Hugging Face `tokenizer.json` for language models.
    Tokenizer = 4,
}

impl SectionKind {
    pub const ALL: [SectionKind; 4] =
        [SectionKind::Meta, SectionKind::Code, SectionKind::Weights, SectionKind::Tokenizer];
    /// Sections every artifact has.
    pub const REQUIRED: [SectionKind; 3] = [SectionKind::Meta, SectionKind::Code, SectionKind::Weights];

    pub fn from_u32(v: u32) -> Option<SectionKind> {
        Self::ALL.into_iter().find(|k| *k as u32 == v)
    }

    pub fn name(self) -> &'static str {
        match self {
            SectionKind::Meta => "META",
            SectionKind::Code => "CODE",
            SectionKind::Weights => "WEIGHTS",
            SectionKind::Tokenizer => "TOKENIZER",
        }
    }
}

impl fmt::Display for SectionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Architectures the format has feature tables for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    X86_64,
    Aarch64,
    Riscv64,
}

const X86_64_FEATURES: &[&str] =
    &["sse3", "ssse3", "sse4.1", "sse4.2", "popcnt", "avx", "avx2", "fma", "bmi1", "bmi2", "lzcnt"];
const AARCH64_FEATURES: &[&str] = &["neon", "dotprod", "i8mm", "fp16"];
const RISCV64_FEATURES: &[&str] = &["v", "zba", "zbb"];

impl Arch {
    /// The architecture named by a triple's first component (`riscv64gc-...` is riscv64).
    pub fn from_triple(triple: &str) -> Option<Arch> {
        match triple.split('-').next()? {
            "x86_64" => Some(Arch::X86_64),
            "aarch64" => Some(Arch::Aarch64),
            a if a.starts_with("riscv64") => Some(Arch::Riscv64),
            _ => None,
        }
    }

    /// The architecture this program runs on, if the format knows it.
    pub fn host() -> Option<Arch> {
        match std::env::consts::ARCH {
            "x86_64" => Some(Arch::X86_64),
            "aarch64" => Some(Arch::Aarch64),
            "riscv64" => Some(Arch::Riscv64),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
            Arch::Riscv64 => "riscv64",
        }
    }

    /// Feature names indexed by bit.
    pub fn feature_names(self) -> &'static [&'static str] {
        match self {
            Arch::X86_64 => X86_64_FEATURES,
            Arch::Aarch64 => AARCH64_FEATURES,
            Arch::Riscv64 => RISCV64_FEATURES,
        }
    }

    /// Bits with a meaning for this architecture; any other set bit is rejected.
    pub fn known_bits(self) -> u64 {
        (1u64 << self.feature_names().len()) - 1
    }

    /// Bits every artifact for this architecture must set (aarch64: neon).
    pub fn mandatory_bits(self) -> u64 {
        match self {
            Arch::Aarch64 => 1,
            _ => 0,
        }
    }

    pub fn feature_bit(self, name: &str) -> Option<u32> {
        self.feature_names().iter().position(|n| *n == name).map(|i| i as u32)
    }

    /// Parses a feature list such as `"+avx,+fma"` (`-name` entries are ignored) into bits.
    pub fn parse_features(self, list: &str) -> Result<u64, String> {
        let mut bits = self.mandatory_bits();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if item.starts_with('-') {
                continue;
            }
            let name = item.strip_prefix('+').unwrap_or(item);
            let bit = self.feature_bit(name).ok_or_else(|| format!("unknown {} feature `{name}`", self.name()))?;
            bits |= 1 << bit;
        }
        Ok(bits)
    }

    /// Names of the set bits; unknown bits appear as `bitN`.
    pub fn feature_list(self, bits: u64) -> Vec<String> {
        let names = self.feature_names();
        (0..64)
            .filter(|b| bits & (1u64 << b) != 0)
            .map(|b| names.get(b).map_or_else(|| format!("bit{b}"), |n| n.to_string()))
            .collect()
    }
}

/// Element types, shared by the compiler's IR and the runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F64,
    I8,
    U8,
    I32,
    I64,
    /// One byte, 0 or 1.
    Bool,
}

impl DType {
    pub const ALL: [DType; 7] = [DType::F32, DType::F64, DType::I8, DType::U8, DType::I32, DType::I64, DType::Bool];

    pub fn size(self) -> usize {
        match self {
            DType::I8 | DType::U8 | DType::Bool => 1,
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::Bool => "bool",
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64)
    }

    pub fn is_int(self) -> bool {
        matches!(self, DType::I8 | DType::U8 | DType::I32 | DType::I64)
    }

    /// The `EDGEC_DTYPE_*` code of the C API (1-based; 0 is never valid).
    pub fn code(self) -> i32 {
        Self::ALL.iter().position(|d| *d == self).map_or(0, |i| i as i32 + 1)
    }

    pub fn from_code(code: i32) -> Option<DType> {
        Self::ALL.get(usize::try_from(code).ok()?.checked_sub(1)?).copied()
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One term of a dimension polynomial: `coefficient * product(symbols)`; JSON `[c, ["a", "b"]]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Term(pub i64, pub Vec<String>);

/// A dimension: the sum of its terms (the empty sum is 0).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Dim(pub Vec<Term>);

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DimError {
    #[error("symbol `{0}` has no value")]
    UnknownSymbol(String),
    #[error("arithmetic overflow")]
    Overflow,
    #[error("negative value {0}")]
    Negative(i64),
}

impl Dim {
    pub fn constant(v: i64) -> Dim {
        Dim(vec![Term(v, vec![])])
    }

    pub fn symbol(name: &str) -> Dim {
        Dim(vec![Term(1, vec![name.to_string()])])
    }

    /// The value when no term names a symbol (None on overflow).
    pub fn as_constant(&self) -> Option<i64> {
        self.0.iter().try_fold(0i64, |acc, Term(c, names)| if names.is_empty() { acc.checked_add(*c) } else { None })
    }

    /// The symbol's name when the dimension is exactly `1 * symbol`.
    pub fn as_symbol(&self) -> Option<&str> {
        match self.0.as_slice() {
            [Term(1, names)] if names.len() == 1 => Some(&names[0]),
            _ => None,
        }
    }

    pub fn symbols(&self) -> impl Iterator<Item = &str> {
        self.0.iter().flat_map(|t| t.1.iter().map(String::as_str))
    }

    /// Evaluates the polynomial with checked arithmetic; a dimension is never negative.
    pub fn eval<K: Borrow<str> + Hash + Eq>(&self, symbols: &HashMap<K, i64>) -> Result<u64, DimError> {
        let mut sum = 0i64;
        for Term(coef, names) in &self.0 {
            let mut term = *coef;
            for name in names {
                let v = symbols.get(name.as_str()).ok_or_else(|| DimError::UnknownSymbol(name.clone()))?;
                term = term.checked_mul(*v).ok_or(DimError::Overflow)?;
            }
            sum = sum.checked_add(term).ok_or(DimError::Overflow)?;
        }
        u64::try_from(sum).map_err(|_| DimError::Negative(sum))
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("0");
        }
        for (i, Term(c, names)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" + ")?;
            }
            match (c, names.is_empty()) {
                (c, true) => write!(f, "{c}")?,
                (1, false) => f.write_str(&names.join("*"))?,
                (c, false) => write!(f, "{c}*{}", names.join("*"))?,
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Symbol {
    pub name: String,
    pub max: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorMeta {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<Dim>,
}

/// How the artifact was compiled; informational only, so missing or extra keys are accepted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompileOptions {
    #[serde(default)]
    pub target: String,
    #[serde(default)]
    pub features: String,
    #[serde(default)]
    pub max_seq: u64,
}

/// The META section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    pub model_name: String,
    pub symbols: Vec<Symbol>,
    pub inputs: Vec<TensorMeta>,
    pub outputs: Vec<TensorMeta>,
    pub arena_bytes: u64,
    pub entry_offset: u64,
    #[serde(default)]
    pub compile_options: CompileOptions,
    /// KV-cache tensors kept in the arena between runs (absent for other models).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kv_cache: Vec<KvCacheSlot>,
    /// Conditions on the symbols the code relies on, checked before every run (absent when none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<Requirement>,
}

/// A size the code needs at run time: `dim`, evaluated over the symbols, must be at least `min`.
/// E.g. a Slice from the end, `x[:, -1:]` (last-position logits), reads row `seq - 1`, so it needs
/// `seq >= 1`; with 0 it would read before its buffer. `what` names the node, for the error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirement {
    pub dim: Dim,
    pub min: u64,
    pub what: String,
}

/// A KV-cache tensor that lives in the arena: input `input` (the past) and output `output` (the
/// present, one step longer along `axis`) are views of one region of `capacity` rows along that
/// axis. A stateful run passes neither; a plain run passes both, and the code copies the past in and
/// the present out. The present's length along `axis` must not exceed `capacity`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvCacheSlot {
    pub input: usize,
    pub output: usize,
    pub axis: usize,
    pub capacity: u64,
}

impl Meta {
    pub fn symbol_index(&self, name: &str) -> Option<usize> {
        self.symbols.iter().position(|s| s.name == name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("the artifact would not load: {0}")]
    Invalid(#[from] LoadError),
    #[error("cannot encode META: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cannot write the artifact: {0}")]
    Io(#[from] io::Error),
}

/// Writes an artifact: META, CODE and WEIGHTS in that order, each 64-byte aligned.
///
/// The target and META are checked with the runtime's own rules first, so the compiler fails
/// at compile time instead of a device failing at load time.
#[derive(Clone, Copy, Debug)]
pub struct ArtifactWriter<'a> {
    pub triple: &'a str,
    pub features: u64,
    pub meta: &'a Meta,
    pub code: &'a [u8],
    pub weights: &'a [u8],
    /// Optional TOKENIZER section (a `tokenizer.json`).
    pub tokenizer: Option<&'a [u8]>,
}

impl<'a> ArtifactWriter<'a> {
    pub fn new(triple: &'a str, features: u64, meta: &'a Meta, code: &'a [u8], weights: &'a [u8]) -> Self {
        ArtifactWriter { triple, features, meta, code, weights, tokenizer: None }
    }

    pub fn with_tokenizer(mut self, tokenizer: Option<&'a [u8]>) -> Self {
        self.tokenizer = tokenizer;
        self
    }

    /// Streams the file to `out`; WEIGHTS is never copied.
    pub fn write_to(&self, out: &mut impl Write) -> Result<(), WriteError> {
        check_target(self.triple, self.features)?;
        validate_meta(self.meta, self.code.len() as u64)?;
        let meta = serde_json::to_vec(self.meta)?;
        if let Some(t) = self.tokenizer {
            std::str::from_utf8(t).map_err(|e| {
                WriteError::Invalid(LoadError::Section {
                    kind: SectionKind::Tokenizer,
                    reason: format!("not valid UTF-8 ({e})"),
                })
            })?;
        }
        let mut sections = vec![
            (SectionKind::Meta as u32, meta.as_slice()),
            (SectionKind::Code as u32, self.code),
            (SectionKind::Weights as u32, self.weights),
        ];
        if let Some(t) = self.tokenizer {
            sections.push((SectionKind::Tokenizer as u32, t));
        }
        let (header, offsets) = build_header(self.triple.as_bytes(), self.features, &sections);
        out.write_all(&header)?;
        let mut pos = header.len() as u64;
        for ((_, bytes), offset) in sections.iter().zip(offsets) {
            io::copy(&mut io::repeat(0).take(offset - pos), out)?;
            out.write_all(bytes)?;
            pos = offset + bytes.len() as u64;
        }
        Ok(())
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>, WriteError> {
        let mut out = Vec::new();
        self.write_to(&mut out)?;
        Ok(out)
    }

    /// Writes to `path` through a temporary file and a rename, so a reader never sees half a file.
    pub fn write_file(&self, path: &Path) -> Result<(), WriteError> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let mut file = io::BufWriter::new(std::fs::File::create(&tmp)?);
        self.write_to(&mut file)?;
        file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}

/// Lays out any section list without validation (the triple is cut at 64 bytes).
///
/// For tests of the reader only: its output may be invalid on purpose.
#[doc(hidden)]
pub fn encode_raw(triple: &[u8], features: u64, sections: &[(u32, &[u8])]) -> Vec<u8> {
    let (mut out, offsets) = build_header(triple, features, sections);
    for ((_, bytes), offset) in sections.iter().zip(offsets) {
        out.resize(offset as usize, 0);
        out.extend_from_slice(bytes);
    }
    out
}

/// The header bytes (with checksum) and the offset of each section.
fn build_header(triple: &[u8], features: u64, sections: &[(u32, &[u8])]) -> (Vec<u8>, Vec<u64>) {
    let len = header_len(sections.len());
    let mut h = Vec::with_capacity(len);
    h.extend_from_slice(&MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&(len as u32).to_le_bytes());
    let mut field = [0u8; TRIPLE_LEN];
    let n = triple.len().min(TRIPLE_LEN);
    field[..n].copy_from_slice(&triple[..n]);
    h.extend_from_slice(&field);
    h.extend_from_slice(&features.to_le_bytes());
    h.extend_from_slice(&(sections.len() as u32).to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    let mut offsets = Vec::with_capacity(sections.len());
    let mut next = align_up(len as u64);
    for (kind, bytes) in sections {
        let size = bytes.len() as u64;
        h.extend_from_slice(&kind.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&next.to_le_bytes());
        h.extend_from_slice(&size.to_le_bytes());
        h.extend_from_slice(&sha256(bytes));
        offsets.push(next);
        next = align_up(next + size);
    }
    let digest = sha256(&h);
    h.extend_from_slice(&digest);
    (h, offsets)
}

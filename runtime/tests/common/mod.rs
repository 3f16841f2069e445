//! Shared fixtures: a tiny hand-assembled x86_64 model, its META, and byte-patching helpers.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use edgec_runtime::format::{encode_raw, sha256, Dim, Symbol, TensorMeta, HASH_LEN};
use edgec_runtime::{ArtifactWriter, DType, Meta};

pub const X86: &str = "x86_64-unknown-linux-gnu";
pub const ARM: &str = "aarch64-unknown-linux-gnu";

/// Where the entry starts in `CODE`: the bytes before it are int3, so a wrong offset traps.
pub const ENTRY: u64 = 16;

/// `entry(call)`: y[i] = x[i] + weights_f32[0] for i < n = symbols[0]; info = [n, arena % 64,
/// weights % 64]; arena[0] = n. Assembled with GNU as (Intel syntax), bytes copied here.
#[rustfmt::skip]
pub const X86_CODE: &[u8] = &[
    0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc,
    0x48, 0x8b, 0x07,                   // mov rax, [rdi]         ; call->inputs
    0x48, 0x8b, 0x30,                   // mov rsi, [rax]         ; x
    0x48, 0x8b, 0x47, 0x08,             // mov rax, [rdi+8]       ; call->outputs
    0x48, 0x8b, 0x10,                   // mov rdx, [rax]         ; y
    0x4c, 0x8b, 0x48, 0x08,             // mov r9, [rax+8]        ; info
    0x4c, 0x8b, 0x47, 0x10,             // mov r8, [rdi+16]       ; call->weights
    0x4c, 0x8b, 0x57, 0x18,             // mov r10, [rdi+24]      ; call->arena
    0x48, 0x8b, 0x4f, 0x20,             // mov rcx, [rdi+32]      ; call->symbols
    0x48, 0x8b, 0x09,                   // mov rcx, [rcx]         ; n
    0x49, 0x89, 0x09,                   // mov [r9], rcx          ; info[0] = n
    0x49, 0x89, 0x0a,                   // mov [r10], rcx         ; arena[0] = n
    0x4c, 0x89, 0xd0,                   // mov rax, r10
    0x83, 0xe0, 0x3f,                   // and eax, 63
    0x49, 0x89, 0x41, 0x08,             // mov [r9+8], rax        ; info[1] = arena % 64
    0x4c, 0x89, 0xc0,                   // mov rax, r8
    0x83, 0xe0, 0x3f,                   // and eax, 63
    0x49, 0x89, 0x41, 0x10,             // mov [r9+16], rax       ; info[2] = weights % 64
    0xf3, 0x41, 0x0f, 0x10, 0x08,       // movss xmm1, [r8]       ; bias
    0x31, 0xc0,                         // xor eax, eax
    0x48, 0x39, 0xc8,                   // loop: cmp rax, rcx
    0x73, 0x13,                         // jae done
    0xf3, 0x0f, 0x10, 0x04, 0x86,       // movss xmm0, [rsi+rax*4]
    0xf3, 0x0f, 0x58, 0xc1,             // addss xmm0, xmm1
    0xf3, 0x0f, 0x11, 0x04, 0x82,       // movss [rdx+rax*4], xmm0
    0x48, 0xff, 0xc0,                   // inc rax
    0xeb, 0xe8,                         // jmp loop
    0xc3,                               // done: ret
];

pub const BIAS: f32 = 0.5;
pub const MAX_N: u64 = 16;

/// Inputs x: f32[1,n], mask: i64[1,n], flag: bool[1]; outputs y: f32[1,n], info: i64[3],
/// z: f32[2n+1] (z is never written by the code: it checks polynomial shapes and zeroing).
pub fn meta() -> Meta {
    let t = |name: &str, dtype, shape| TensorMeta { name: name.into(), dtype, shape };
    let n = || Dim::symbol("n");
    let c = Dim::constant;
    let two_n_plus_1: Dim = serde_json::from_str(r#"[[2, ["n"]], [1, []]]"#).unwrap();
    Meta {
        model_name: "add_bias".into(),
        symbols: vec![Symbol { name: "n".into(), max: MAX_N }],
        inputs: vec![
            t("x", DType::F32, vec![c(1), n()]),
            t("mask", DType::I64, vec![c(1), n()]),
            t("flag", DType::Bool, vec![c(1)]),
        ],
        outputs: vec![
            t("y", DType::F32, vec![c(1), n()]),
            t("info", DType::I64, vec![c(3)]),
            t("z", DType::F32, vec![two_n_plus_1]),
        ],
        arena_bytes: 64,
        entry_offset: ENTRY,
        compile_options: Default::default(),
        kv_cache: Vec::new(),
        requires: Vec::new(),
    }
}

/// WEIGHTS: the bias, then some padding so the section is not trivially small.
pub fn weights() -> Vec<u8> {
    let mut w = BIAS.to_le_bytes().to_vec();
    w.resize(100, 0xAB);
    w
}

pub fn artifact(triple: &str, features: u64) -> Vec<u8> {
    let (meta, w) = (meta(), weights());
    ArtifactWriter::new(triple, features, &meta, X86_CODE, &w).to_bytes().unwrap()
}

/// The valid x86_64 artifact with no required features.
pub fn x86_artifact() -> Vec<u8> {
    artifact(X86, 0)
}

/// An artifact with the given META JSON (valid or not) and the x86_64 code.
pub fn with_meta_json(json: &str) -> Vec<u8> {
    encode_raw(X86.as_bytes(), 0, &[(1, json.as_bytes()), (2, X86_CODE), (3, &weights())])
}

/// A unique path under cargo's per-target temp dir.
pub fn tmp_path(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("edgec-runtime");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{name}-{}-{}.edgec", std::process::id(), N.fetch_add(1, Ordering::Relaxed)))
}

pub fn write_tmp(name: &str, bytes: &[u8]) -> PathBuf {
    let path = tmp_path(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

pub fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

pub fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

pub fn header_len(b: &[u8]) -> usize {
    u32_at(b, 12) as usize
}

/// Recomputes the header checksum after a deliberate header edit.
pub fn reseal(b: &mut [u8]) {
    let end = header_len(b) - HASH_LEN;
    let digest = sha256(&b[..end]);
    b[end..end + HASH_LEN].copy_from_slice(&digest);
}

/// Byte offset of a field of section table entry `index` (+0 kind, +4 flags, +8 offset, +16 length).
pub fn entry_field(index: usize, field: usize) -> usize {
    96 + index * 56 + field
}

pub fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

pub fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// (kind, offset, length) of each table entry.
pub fn sections(b: &[u8]) -> Vec<(u32, usize, usize)> {
    (0..u32_at(b, 88) as usize)
        .map(|i| {
            (
                u32_at(b, entry_field(i, 0)),
                u64_at(b, entry_field(i, 8)) as usize,
                u64_at(b, entry_field(i, 16)) as usize,
            )
        })
        .collect()
}

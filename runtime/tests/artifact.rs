//! The reader: every corruption, truncation and schema violation is refused, naming its field.

mod common;

use common::*;
use edgec_runtime::format::{encode_raw, SectionKind};
use edgec_runtime::{Artifact, LoadError};

fn parse_err(bytes: &[u8]) -> LoadError {
    match Artifact::parse(bytes) {
        Ok(_) => panic!("accepted an invalid artifact"),
        Err(e) => e,
    }
}

/// Applies `edit` to a valid artifact, reseals the header, and returns the error.
fn edited(edit: impl FnOnce(&mut Vec<u8>)) -> LoadError {
    let mut b = x86_artifact();
    edit(&mut b);
    reseal(&mut b);
    parse_err(&b)
}

#[test]
fn valid_artifact_parses() {
    let bytes = x86_artifact();
    let art = Artifact::parse(&bytes).unwrap();
    assert_eq!(art.version, 1);
    assert_eq!(art.sections.len(), 3);
    assert_eq!(art.weights, weights().as_slice());
    assert_eq!(art.section(SectionKind::Code).unwrap().len, X86_CODE.len() as u64);
}

#[test]
fn every_single_byte_flip_is_rejected() {
    let bytes = x86_artifact();
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x01;
        assert!(Artifact::parse(&b).is_err(), "flip at byte {i} was accepted");
    }
}

#[test]
fn section_flips_name_the_section() {
    let bytes = x86_artifact();
    for (kind, off, len) in sections(&bytes) {
        let kind = SectionKind::from_u32(kind).unwrap();
        for at in [off, off + len / 2, off + len - 1] {
            let mut b = bytes.clone();
            b[at] ^= 0x80;
            let e = parse_err(&b);
            assert!(matches!(e, LoadError::SectionChecksum(k) if k == kind), "byte {at}: {e}");
            assert!(e.to_string().starts_with(&format!("{kind} section checksum mismatch")), "{e}");
        }
    }
}

#[test]
fn header_flips_are_rejected_by_field() {
    let bytes = x86_artifact();
    let hlen = header_len(&bytes);
    for i in 0..hlen {
        let mut b = bytes.clone();
        b[i] ^= 0x01;
        let e = parse_err(&b);
        let ok = match i {
            0..8 => matches!(e, LoadError::Magic),
            8 => matches!(e, LoadError::BadVersion(0)),
            9..12 => matches!(e, LoadError::NewerVersion(_)),
            12..16 => matches!(e, LoadError::HeaderLength { .. }),
            88..92 => matches!(e, LoadError::SectionCount(_) | LoadError::HeaderLength { .. }),
            _ => matches!(e, LoadError::HeaderChecksum),
        };
        assert!(ok, "byte {i}: {e}");
    }
    // A flipped triple byte must not slip through: the checksum covers it.
    let mut b = bytes.clone();
    b[16] = b'a';
    assert_eq!(parse_err(&b).to_string(), "header checksum mismatch: the header is corrupt");
}

#[test]
fn truncation_anywhere_is_rejected() {
    let bytes = x86_artifact();
    let mut cuts: Vec<usize> = (0..bytes.len()).step_by(7).collect();
    cuts.push(bytes.len() - 1);
    for len in cuts {
        let e = parse_err(&bytes[..len]);
        let ok = matches!(e, LoadError::Truncated { .. } | LoadError::Section { .. });
        assert!(ok, "cut at {len}: {e}");
    }
    assert_eq!(parse_err(&[]).to_string(), "file is 0 bytes, too short for the magic (needs 8)");
}

#[test]
fn future_and_invalid_versions() {
    let mut b = x86_artifact();
    b[8..12].copy_from_slice(&2u32.to_le_bytes());
    let e = parse_err(&b);
    assert!(matches!(e, LoadError::NewerVersion(2)));
    assert!(e.to_string().contains("made by a newer edgec"), "{e}");
    b[8..12].copy_from_slice(&0u32.to_le_bytes());
    assert!(matches!(parse_err(&b), LoadError::BadVersion(0)));
}

#[test]
fn magic() {
    let mut b = x86_artifact();
    b[0] = b'X';
    assert_eq!(parse_err(&b).to_string(), "magic: not an edgec artifact");
    assert!(matches!(parse_err(b"ELF\x7fnot an artifact at all"), LoadError::Magic));
}

#[test]
fn section_count_and_header_length() {
    for count in [0u32, 17, u32::MAX] {
        let mut b = x86_artifact();
        put_u32(&mut b, 88, count);
        assert!(matches!(parse_err(&b), LoadError::SectionCount(c) if c == count));
    }
    let mut b = x86_artifact();
    put_u32(&mut b, 12, 96);
    assert_eq!(parse_err(&b).to_string(), "header length 96: 3 sections need 296");
    // 17 sections written out in full are still refused.
    let many: Vec<(u32, &[u8])> = (0..17).map(|_| (3, &b"x"[..])).collect();
    assert!(matches!(parse_err(&encode_raw(X86.as_bytes(), 0, &many)), LoadError::SectionCount(17)));
}

#[test]
fn reserved_field_and_triple_padding() {
    let e = edited(|b| put_u32(b, 92, 1));
    assert!(matches!(e, LoadError::Reserved(1)), "{e}");
    let e = edited(|b| b[79] = b'x');
    assert!(matches!(e, LoadError::Triple(_)), "{e}");
    let raw = |triple: &[u8]| encode_raw(triple, 0, &[(1, b"{}"), (2, X86_CODE), (3, b"")]);
    assert!(matches!(parse_err(&raw(b"\xff\xfe-linux")), LoadError::Triple(_)));
    assert!(matches!(parse_err(&raw(b"")), LoadError::Triple(_)));
    let e = parse_err(&raw(b"wasm32-unknown-unknown"));
    assert!(e.to_string().contains("unsupported architecture"), "{e}");
}

#[test]
fn feature_bits_are_checked_against_the_table() {
    let e = edited(|b| put_u64(b, 80, 1 << 63));
    assert_eq!(e.to_string(), "required CPU features: bit63 undefined for x86_64 (made by a newer edgec?)");
    let e = edited(|b| put_u64(b, 80, 1 << 11));
    assert!(matches!(e, LoadError::Features(_)), "{e}");
    // aarch64 must always require neon.
    let e = parse_err(&encode_raw(ARM.as_bytes(), 0b10, &[(1, b"{}"), (2, X86_CODE), (3, b"")]));
    assert_eq!(e.to_string(), "required CPU features: neon must always be set for aarch64");
    assert!(Artifact::parse(&artifact(ARM, 0b11)).is_ok(), "a foreign target still parses; Model::load refuses it");
}

#[test]
fn section_table_entries() {
    let bytes = x86_artifact();
    let secs = sections(&bytes);
    let msg = |edit: &dyn Fn(&mut Vec<u8>)| edited(|b| edit(b)).to_string();
    assert_eq!(msg(&|b| put_u32(b, entry_field(2, 0), 9)), "section table entry 2: unknown section kind 9");
    assert_eq!(msg(&|b| put_u32(b, entry_field(1, 0), 1)), "META section: appears more than once");
    assert_eq!(msg(&|b| put_u32(b, entry_field(2, 4), 4)), "WEIGHTS section: flags 0x4, must be 0");
    let off = secs[0].1 as u64;
    assert_eq!(
        msg(&|b| put_u64(b, entry_field(0, 8), off + 8)),
        format!("META section: offset {} is not a multiple of 64", off + 8)
    );
    assert_eq!(msg(&|b| put_u64(b, entry_field(0, 8), 0)), "META section: offset 0 is inside the 296-byte header");
    let e = msg(&|b| put_u64(b, entry_field(2, 16), u64::MAX - 63));
    assert!(e.starts_with("WEIGHTS section: offset") && e.ends_with("overflows"), "{e}");
    let e = msg(&|b| put_u64(b, entry_field(2, 16), 1 << 40));
    assert!(e.starts_with("WEIGHTS section: bytes") && e.contains("outside the"), "{e}");
    let e = msg(&|b| put_u64(b, entry_field(1, 8), off));
    assert!(e.contains("overlaps the META section") || e.contains("overlaps the CODE section"), "{e}");
}

#[test]
fn missing_section() {
    let b = encode_raw(X86.as_bytes(), 0, &[(1, b"{}"), (2, X86_CODE)]);
    assert_eq!(parse_err(&b).to_string(), "WEIGHTS section is missing");
}

#[test]
fn padding_must_be_zero() {
    let mut b = x86_artifact();
    let first = sections(&b)[0].1;
    b[first - 1] = 1;
    assert!(matches!(parse_err(&b), LoadError::Padding(p) if p as usize == first - 1));
    // Trailing bytes: zeros are padding, anything else is refused.
    let mut b = x86_artifact();
    b.extend_from_slice(&[0; 10]);
    assert!(Artifact::parse(&b).is_ok());
    b.push(7);
    assert!(matches!(parse_err(&b), LoadError::Padding(_)));
}

fn meta_err(json: &str) -> String {
    parse_err(&with_meta_json(json)).to_string()
}

fn valid_meta_json() -> serde_json::Value {
    serde_json::to_value(meta()).unwrap()
}

fn meta_with(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut v = valid_meta_json();
    edit(&mut v);
    meta_err(&v.to_string())
}

#[test]
fn meta_must_be_utf8_json_of_the_schema() {
    assert!(Artifact::parse(&with_meta_json(&valid_meta_json().to_string())).is_ok());
    let b = encode_raw(X86.as_bytes(), 0, &[(1, b"\xff{}"), (2, X86_CODE), (3, b"")]);
    assert!(parse_err(&b).to_string().starts_with("META section: not valid UTF-8"));
    assert!(meta_err("{").starts_with("META JSON: EOF"));
    assert!(meta_err("{}").contains("missing field `model_name`"));
    assert!(meta_with(|v| v["extra"] = 1.into()).contains("unknown field `extra`"));
    assert!(meta_with(|v| v["inputs"][0]["dtype"] = "f16".into()).contains("unknown variant `f16`"));
    assert!(meta_with(|v| v["arena_bytes"] = (-1).into()).starts_with("META JSON:"));
    assert!(meta_with(|v| v["inputs"][0]["shape"][1] = serde_json::json!([[1.5, []]])).starts_with("META JSON:"));
}

#[test]
fn meta_rules_name_the_field() {
    use serde_json::json;
    assert_eq!(
        meta_with(|v| v["outputs"][2]["shape"][0] = json!([[2, ["m"]]])),
        "META outputs[2].shape[0]: symbol `m` is not declared in `symbols`"
    );
    assert_eq!(
        meta_with(|v| v["requires"] = json!([{"dim": [[1, ["m"]]], "min": 1, "what": "Slice `s`"}])),
        "META requires[0].dim: symbol `m` is not declared in `symbols`"
    );
    assert!(meta_with(|v| v["requires"] = json!([{"dim": [[1, []]], "min": 1, "what": ""}]))
        .starts_with("META requires[0].what"));
    assert_eq!(
        meta_with(|v| v["inputs"][0]["shape"][1] = json!([[2, ["n"]]])),
        "META inputs[0].shape[1]: `2*n` is neither a constant nor a single symbol"
    );
    assert_eq!(
        meta_with(|v| v["inputs"][2]["shape"][0] = json!([[-1, []]])),
        "META inputs[2].shape[0]: `-1` is neither a constant nor a single symbol"
    );
    assert_eq!(
        meta_with(|v| v["symbols"] = json!([{"name": "n", "max": 16}, {"name": "k", "max": 4}])),
        "META symbols[1]: `k` is not the dimension of any input, so it cannot be bound"
    );
    assert_eq!(
        meta_with(|v| v["symbols"] = json!([{"name": "n", "max": 16}, {"name": "n", "max": 4}])),
        "META symbols[1].name: `n` is declared twice"
    );
    assert_eq!(meta_with(|v| v["symbols"][0]["max"] = 0.into()), "META symbols[0].max: 0 is not 1..=i64::MAX");
    assert_eq!(meta_with(|v| v["inputs"][1]["name"] = "x".into()), "META inputs[1].name: `x` appears twice");
    assert_eq!(
        meta_with(|v| v["outputs"][0]["name"] = "".into()),
        "META outputs[0].name: \"\" is empty or contains NUL"
    );
    assert!(meta_with(|v| v["outputs"][0]["name"] = "a\0b".into()).starts_with("META outputs[0].name:"));
    assert_eq!(
        meta_with(|v| v["entry_offset"] = (X86_CODE.len() as u64).into()),
        format!("META entry_offset: {} is not inside the {}-byte CODE section", X86_CODE.len(), X86_CODE.len())
    );
    assert_eq!(
        meta_with(|v| v["arena_bytes"] = (1u64 << 40).into()),
        "META arena_bytes: 1099511627776 is not below 2^40"
    );
    // Inputs and outputs may share a name; compile_options is informational.
    let mut v = valid_meta_json();
    v["outputs"][0]["name"] = "x".into();
    v["compile_options"] = json!({"target": "x86_64", "future_option": true});
    assert!(Artifact::parse(&with_meta_json(&v.to_string())).is_ok());
}

#[test]
fn kv_cache_slots_are_checked() {
    use serde_json::json;
    let slot = |input: u64, output: u64, axis: u64, capacity: u64| json!({"input": input, "output": output, "axis": axis, "capacity": capacity});
    // x [1, n] grows into y [1, n] along axis 1.
    let mut v = valid_meta_json();
    v["kv_cache"] = json!([slot(0, 0, 1, 16)]);
    assert!(Artifact::parse(&with_meta_json(&v.to_string())).is_ok());
    assert_eq!(
        meta_with(|v| v["kv_cache"] = json!([slot(0, 7, 1, 16)])),
        "META kv_cache[0]: input 0 or output 7 does not exist"
    );
    assert_eq!(
        meta_with(|v| v["kv_cache"] = json!([slot(0, 0, 1, 16), slot(0, 0, 1, 16)])),
        "META kv_cache[1]: an input or output is named by two slots"
    );
    assert_eq!(
        meta_with(|v| v["kv_cache"] = json!([slot(0, 2, 0, 16)])),
        "META kv_cache[0]: `x` and `z` differ in dtype or rank, or axis 0 is out of range"
    );
    assert_eq!(
        meta_with(|v| v["kv_cache"] = json!([slot(0, 0, 0, 16)])),
        "META kv_cache[0]: `y` must be `x` grown along axis 0 of a symbolic length"
    );
    assert_eq!(
        meta_with(|v| v["kv_cache"] = json!([slot(0, 0, 1, 0)])),
        "META kv_cache[0]: capacity 0 is not 1..=i64::MAX"
    );
    assert!(meta_with(|v| v["kv_cache"] = json!([{"input": 0}])).contains("missing field `output`"));
}

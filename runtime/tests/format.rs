//! The format module: dims, dtypes, feature tables, and the writer's layout.

mod common;

use std::collections::HashMap;

use common::*;
use edgec_runtime::format::{sha256, Arch, Dim, DimError, SECTION_ALIGN};
use edgec_runtime::{Artifact, ArtifactWriter, DType, LoadError, WriteError};

fn env(pairs: &[(&'static str, i64)]) -> HashMap<&'static str, i64> {
    pairs.iter().copied().collect()
}

#[test]
fn dim_eval_and_display() {
    let d: Dim = serde_json::from_str(r#"[[3, ["b", "s"]], [-1, ["s"]], [7, []]]"#).unwrap();
    assert_eq!(d.eval(&env(&[("b", 2), ("s", 5)])), Ok(3 * 2 * 5 - 5 + 7));
    assert_eq!(d.to_string(), "3*b*s + -1*s + 7");
    assert_eq!(Dim::default().eval(&env(&[])), Ok(0));
    assert_eq!(Dim::default().to_string(), "0");
    assert_eq!(Dim::symbol("s").to_string(), "s");
    assert_eq!(d.eval(&env(&[("b", 2)])), Err(DimError::UnknownSymbol("s".into())));
    assert_eq!(Dim::constant(-3).eval(&env(&[])), Err(DimError::Negative(-3)));
    let big: Dim = serde_json::from_str(r#"[[4611686018427387904, ["s"]]]"#).unwrap();
    assert_eq!(big.eval(&env(&[("s", 2)])), Err(DimError::Overflow));
    let sum: Dim = serde_json::from_str(r#"[[9223372036854775807, []], [1, []]]"#).unwrap();
    assert_eq!(sum.eval(&env(&[])), Err(DimError::Overflow));
    // Works with owned keys too.
    let owned: HashMap<String, i64> = [("s".to_string(), 4)].into();
    assert_eq!(Dim::symbol("s").eval(&owned), Ok(4));
}

#[test]
fn dim_classification() {
    assert_eq!(Dim::constant(5).as_constant(), Some(5));
    assert_eq!(Dim::default().as_constant(), Some(0));
    assert_eq!(Dim::symbol("s").as_constant(), None);
    assert_eq!(Dim::symbol("s").as_symbol(), Some("s"));
    let two_s: Dim = serde_json::from_str(r#"[[2, ["s"]]]"#).unwrap();
    assert_eq!(two_s.as_symbol(), None);
    let s_plus_1: Dim = serde_json::from_str(r#"[[1, ["s"]], [1, []]]"#).unwrap();
    assert_eq!(s_plus_1.as_symbol(), None);
}

#[test]
fn meta_json_matches_the_spec_example() {
    let json = r#"{
      "model_name": "main_graph",
      "symbols": [{"name": "sequence_length", "max": 2048}],
      "inputs":  [{"name": "input_ids", "dtype": "i64", "shape": [[[1, []]], [[1, ["sequence_length"]]]]}],
      "outputs": [{"name": "logits", "dtype": "f32", "shape": [[[1, []]], [[1, ["sequence_length"]]], [[49152, []]]]}],
      "arena_bytes": 123456,
      "entry_offset": 0,
      "compile_options": {"target": "x86_64", "features": "+avx,+fma", "max_seq": 2048}
    }"#;
    let meta: edgec_runtime::Meta = serde_json::from_str(json).unwrap();
    assert_eq!(meta.inputs[0].shape[1], Dim::symbol("sequence_length"));
    assert_eq!(meta.outputs[0].shape[2], Dim::constant(49152));
    assert_eq!(meta.compile_options.max_seq, 2048);
    let back: edgec_runtime::Meta = serde_json::from_slice(&serde_json::to_vec(&meta).unwrap()).unwrap();
    assert_eq!(back, meta);
}

#[test]
fn dtype_codes_round_trip() {
    for (i, d) in DType::ALL.into_iter().enumerate() {
        assert_eq!(d.code(), i as i32 + 1);
        assert_eq!(DType::from_code(d.code()), Some(d));
        assert_eq!(serde_json::to_string(&d).unwrap(), format!("\"{}\"", d.name()));
    }
    assert_eq!(DType::from_code(0), None);
    assert_eq!(DType::from_code(8), None);
    assert_eq!(DType::from_code(-1), None);
    assert_eq!(DType::Bool.size(), 1);
    assert_eq!(DType::I64.size(), 8);
}

#[test]
fn feature_tables() {
    assert_eq!(Arch::X86_64.feature_bit("sse3"), Some(0));
    assert_eq!(Arch::X86_64.feature_bit("lzcnt"), Some(10));
    assert_eq!(Arch::X86_64.known_bits(), 0x7ff);
    assert_eq!(Arch::Aarch64.feature_bit("fp16"), Some(3));
    assert_eq!(Arch::Riscv64.feature_bit("zbb"), Some(2));
    assert_eq!(Arch::X86_64.parse_features("+avx, +fma, -avx512f"), Ok((1 << 5) | (1 << 7)), "`-` entries are ignored");
    assert_eq!(Arch::X86_64.parse_features("+avx,+fma,-bmi2"), Ok((1 << 5) | (1 << 7)));
    assert!(Arch::X86_64.parse_features("+avx512f").is_err());
    assert_eq!(Arch::Aarch64.parse_features(""), Ok(1), "neon is always set");
    assert_eq!(Arch::X86_64.feature_list((1 << 6) | (1 << 40)), vec!["avx2", "bit40"]);
    assert_eq!(Arch::from_triple("x86_64-unknown-linux-gnu"), Some(Arch::X86_64));
    assert_eq!(Arch::from_triple("aarch64-linux-android"), Some(Arch::Aarch64));
    assert_eq!(Arch::from_triple("riscv64gc-unknown-linux-gnu"), Some(Arch::Riscv64));
    assert_eq!(Arch::from_triple("armv7-unknown-linux-gnueabihf"), None);
}

#[test]
fn writer_layout_is_aligned_padded_and_hashed() {
    let bytes = x86_artifact();
    assert_eq!(&bytes[..8], b"EDGEC\0AF");
    assert_eq!(u32_at(&bytes, 8), 1);
    assert_eq!(header_len(&bytes), 96 + 3 * 56 + 32);
    assert_eq!(&bytes[16..16 + X86.len()], X86.as_bytes());
    assert!(bytes[16 + X86.len()..80].iter().all(|&b| b == 0));
    let secs = sections(&bytes);
    assert_eq!(secs.iter().map(|s| s.0).collect::<Vec<_>>(), vec![1, 2, 3]);
    let mut pos = header_len(&bytes);
    for (i, &(_, off, len)) in secs.iter().enumerate() {
        assert_eq!(off as u64 % SECTION_ALIGN, 0);
        assert!(bytes[pos..off].iter().all(|&b| b == 0), "padding before section {i}");
        assert!(off - pos < 64, "no more padding than needed");
        assert_eq!(&bytes[entry_field(i, 24)..entry_field(i, 56)], &sha256(&bytes[off..off + len]));
        pos = off + len;
    }
    assert_eq!(pos, bytes.len(), "the file ends with the last section");
    assert_eq!(&bytes[secs[1].1..secs[1].1 + secs[1].2], X86_CODE);
    assert_eq!(&bytes[secs[2].1..secs[2].1 + secs[2].2], weights().as_slice());
    let art = Artifact::parse(&bytes).unwrap();
    assert_eq!(art.meta, meta());
    assert_eq!(art.code, X86_CODE);
    assert_eq!(art.triple, X86);
}

#[test]
fn writer_handles_empty_weights_and_files() {
    let meta = meta();
    let w = ArtifactWriter::new(X86, 0b101, &meta, X86_CODE, &[]);
    let bytes = w.to_bytes().unwrap();
    let art = Artifact::parse(&bytes).unwrap();
    assert!(art.weights.is_empty());
    assert_eq!(art.features, 0b101);
    let path = tmp_path("writer");
    w.write_file(&path).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}

#[test]
fn writer_refuses_what_the_runtime_would_refuse() {
    let meta = meta();
    let err = |w: ArtifactWriter| match w.to_bytes() {
        Err(WriteError::Invalid(e)) => e,
        other => panic!("expected Invalid, got {other:?}"),
    };
    let e = err(ArtifactWriter::new("wasm32-unknown-unknown", 0, &meta, X86_CODE, &[]));
    assert!(matches!(e, LoadError::Triple(_)), "{e}");
    let long = format!("x86_64-{}", "a".repeat(60));
    assert!(matches!(err(ArtifactWriter::new(&long, 0, &meta, X86_CODE, &[])), LoadError::Triple(_)));
    assert!(matches!(err(ArtifactWriter::new(X86, 1 << 11, &meta, X86_CODE, &[])), LoadError::Features(_)));
    assert!(matches!(err(ArtifactWriter::new(ARM, 0, &meta, X86_CODE, &[])), LoadError::Features(_)));
    let e = err(ArtifactWriter::new(X86, 0, &meta, &X86_CODE[..16], &[]));
    assert!(e.to_string().contains("entry_offset"), "{e}");
    let mut bad = meta.clone();
    bad.outputs[0].shape[1] = Dim::symbol("nope");
    let e = err(ArtifactWriter::new(X86, 0, &bad, X86_CODE, &[]));
    assert_eq!(e.to_string(), "META outputs[0].shape[1]: symbol `nope` is not declared in `symbols`");
}

/// The optional TOKENIZER section round-trips, is checksummed like the others, and must be UTF-8.
#[test]
fn tokenizer_section_round_trips() {
    use edgec_runtime::{Artifact, ArtifactWriter, SectionKind};
    let meta = common::meta();
    let json = br#"{"version":"1.0","model":{"type":"BPE"}}"#;
    let bytes = ArtifactWriter::new(common::X86, 0, &meta, common::X86_CODE, &[])
        .with_tokenizer(Some(json))
        .to_bytes()
        .unwrap();
    let art = Artifact::parse(&bytes).unwrap();
    assert_eq!(art.tokenizer, Some(std::str::from_utf8(json).unwrap()));
    let s = art.section(SectionKind::Tokenizer).unwrap().range();
    let mut bad = bytes.clone();
    bad[s.start + 3] ^= 1;
    assert!(
        Artifact::parse(&bad).unwrap_err().to_string().contains("TOKENIZER"),
        "{}",
        Artifact::parse(&bad).unwrap_err()
    );
    let no = ArtifactWriter::new(common::X86, 0, &meta, common::X86_CODE, &[]).to_bytes().unwrap();
    assert_eq!(Artifact::parse(&no).unwrap().tokenizer, None);
    assert!(ArtifactWriter::new(common::X86, 0, &meta, common::X86_CODE, &[])
        .with_tokenizer(Some(&[0xff, 0xfe]))
        .to_bytes()
        .is_err());
}

//! Bad input gets a clear error, never a panic: malformed and corrupted ONNX
//! bytes, unsupported ops (all listed at once), dangling tensor names, and feeds
//! with the wrong name, dtype or shape.

mod common;

use edgec::interp::Interpreter;
use edgec::ir::Tensor;
use edgec::Error;
use prost::Message;

/// Imports `bytes` and, when that succeeds, runs the graph: either may fail,
/// neither may panic.
fn import_and_run(bytes: Vec<u8>, feeds: &[(String, Tensor)]) -> Result<(), String> {
    let g = edgec::onnx::load_model_bytes(bytes.into(), None, "fuzzed").map_err(|e| e.to_string())?;
    // The passes must not panic on whatever imported; the graph as imported is what runs.
    let mut g2 = g.clone();
    edgec::passes::PassManager::default_pipeline().run(&mut g2, &mut |_, _, _| {}).map_err(|e| e.to_string())?;
    Interpreter::new(&g).and_then(|i| i.run(feeds)).map_err(|e| e.to_string())?;
    Ok(())
}

/// Deterministic pseudo-random numbers (64-bit LCG) for reproducible corruption.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % n
    }
}

#[test]
fn truncated_and_bit_flipped_models_never_panic() {
    let mut outcomes = [0usize; 2];
    for name in ["llama", "gpt2", "bert_int8", "qdq_mlp"] {
        let dir = common::repo_root().join("models/tiny").join(name);
        let bytes = std::fs::read(dir.join("model.onnx")).unwrap();
        let feeds = common::read_npy_dir(&dir.join("inputs"));
        let len = bytes.len();
        // Truncation at the first bytes and at 150 points through the file.
        let cuts: Vec<usize> = (0..64).chain((1..150).map(|i| i * len / 150)).collect();
        for cut in cuts {
            outcomes[import_and_run(bytes[..cut].to_vec(), &feeds).is_ok() as usize] += 1;
        }
        // 300 single-bit flips and 100 random byte overwrites.
        let mut rng = Lcg(len as u64);
        for i in 0..400 {
            let mut b = bytes.clone();
            let at = rng.next(len);
            if i < 300 {
                b[at] ^= 1 << rng.next(8);
            } else {
                b[at] = rng.next(256) as u8;
            }
            outcomes[import_and_run(b, &feeds).is_ok() as usize] += 1;
        }
    }
    // Most corruptions must be caught; flips inside weight data legitimately run.
    println!("rejected {}, ran {}", outcomes[0], outcomes[1]);
    assert!(outcomes[0] > 200, "suspiciously few corruptions detected: {outcomes:?}");
}

#[test]
fn empty_and_garbage_files_are_malformed() {
    for bytes in [vec![], b"definitely not protobuf".to_vec(), vec![0xff; 64]] {
        match edgec::onnx::load_model_bytes(bytes.into(), None, "junk.onnx") {
            Err(Error::Malformed { path, .. }) => assert_eq!(path, "junk.onnx"),
            other => panic!("expected a malformed-model error, got {other:?}"),
        }
    }
}

#[test]
fn all_unsupported_ops_are_listed_at_once() {
    use common::{model, node, value_info};
    let mut ms = node("FancyOp", &["t"], &["u"]);
    ms.domain = Some("com.microsoft".into());
    let m = model(
        17,
        vec![node("Conv", &["x", "x"], &["c"]), node("Relu", &["c"], &["t"]), ms, node("NonZero", &["u"], &["y"])],
        vec![value_info("x", 1, &["1", "1", "4", "4"])],
        vec![value_info("y", 7, &["2", "n"])],
        vec![],
    );
    let err = edgec::onnx::load_model_bytes(m.encode_to_vec().into(), None, "m.onnx").unwrap_err();
    let Error::Unsupported(list) = &err else { panic!("expected Unsupported, got {err}") };
    let ops: Vec<&str> = list.iter().map(|u| u.op.as_str()).collect();
    assert_eq!(ops, ["Conv", "com.microsoft.FancyOp", "NonZero"]);
    let text = err.to_string();
    assert!(text.starts_with("the model uses 3 unsupported op(s)"), "{text}");
    assert!(text.contains("node 'Conv_c' (Conv, opset 17)"), "{text}");
}

#[test]
fn opset_outside_range_is_unsupported() {
    use common::{model, node, value_info};
    let m = model(
        11,
        vec![node("Relu", &["x"], &["y"])],
        vec![value_info("x", 1, &["2"])],
        vec![value_info("y", 1, &["2"])],
        vec![],
    );
    let err = edgec::onnx::load_model_bytes(m.encode_to_vec().into(), None, "old.onnx").unwrap_err();
    assert!(err.to_string().contains("opset 11 is outside the supported range 13..=28"), "{err}");
}

#[test]
fn dangling_input_names_the_node() {
    use common::{model, node, value_info};
    let m = model(
        17,
        vec![node("Add", &["x", "nowhere"], &["y"])],
        vec![value_info("x", 1, &["2"])],
        vec![value_info("y", 1, &["2"])],
        vec![],
    );
    let err = edgec::onnx::load_model_bytes(m.encode_to_vec().into(), None, "m.onnx").unwrap_err().to_string();
    assert!(err.contains("node 'Add_y' (Add, opset 17)") && err.contains("'nowhere'"), "{err}");
}

#[test]
fn inconsistent_shapes_are_reported_at_import() {
    use common::{f32_initializer, model, node, value_info};
    let m = model(
        17,
        vec![node("MatMul", &["x", "w"], &["y"])],
        vec![value_info("x", 1, &["batch", "8"])],
        vec![value_info("y", 1, &["batch", "4"])],
        vec![f32_initializer("w", &[6, 4], &[0.0; 24])],
    );
    let err = edgec::onnx::load_model_bytes(m.encode_to_vec().into(), None, "m.onnx").unwrap_err().to_string();
    assert!(err.contains("MatMul_y"), "{err}");
}

#[test]
fn wrong_feeds_are_rejected_by_name() {
    let dir = common::repo_root().join("models/tiny/llama");
    let g = edgec::onnx::load_model(&dir.join("model.onnx")).unwrap();
    let feeds = common::read_npy_dir(&dir.join("inputs"));
    let interp = Interpreter::new(&g).unwrap();
    let run = |f: Vec<(String, Tensor)>| interp.run(&f).unwrap_err().to_string();

    let mut f = feeds.clone();
    f.retain(|(n, _)| n != "position_ids");
    assert!(run(f).contains("input 'position_ids' was not given"));

    let mut f = feeds.clone();
    f.push(("typo".into(), Tensor::scalar(1i64)));
    assert!(run(f).contains("'typo' is not an input of the model"));

    let mut f = feeds.clone();
    f[0].1 = f[0].1.cast(edgec::ir::DType::I32);
    let e = run(f);
    assert!(e.contains(&format!("input '{}' has type i32 but i64 was expected", feeds[0].0)), "{e}");

    // attention_mask with a different sequence length than input_ids.
    let mut f = feeds.clone();
    let i = f.iter().position(|(n, _)| n == "input_ids").unwrap();
    f[i].1 = Tensor::from_vec(vec![2, 5], vec![1i64; 10]);
    let e = run(f);
    assert!(e.contains("sequence_length"), "{e}");
}

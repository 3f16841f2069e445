//! The tiny Llama, GPT-2 and BERT fixtures (models/tiny, written by
//! models/make_tiny_models.py) through import, the default pass pipeline and the
//! reference interpreter, against onnxruntime's outputs stored beside them.

mod common;

use edgec::interp::Interpreter;
use edgec::passes::PassManager;
use std::time::Instant;

/// onnxruntime (graph optimisations off) vs our interpreter: rtol 1e-4, with an
/// atol of 1e-5 for values near zero (logits here have std ~4).
const RTOL: f64 = 1e-4;
const ATOL: f64 = 1e-5;

#[test]
fn tiny_models_match_onnxruntime() {
    let models = common::tiny_models();
    assert!(models.len() >= 6, "fixtures missing: {models:?}");
    for (name, dir) in models {
        let feeds = common::read_npy_dir(&dir.join("inputs"));
        let expected = common::read_npy_dir(&dir.join("expected"));
        let imported = edgec::onnx::load_model(&dir.join("model.onnx")).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut optimized = imported.clone();
        PassManager::default_pipeline().run(&mut optimized, &mut |_, _, _| {}).unwrap();
        // nbits_mlp (MatMulNBits, Add, ...) is written without anything to fold or fuse.
        assert!(
            optimized.op_count() < imported.op_count() || name == "nbits_mlp",
            "{name}: the default pipeline removed nothing"
        );
        for (label, g) in [("as imported", &imported), ("after passes", &optimized)] {
            let t0 = Instant::now();
            let outs = Interpreter::new(g).unwrap().run(&feeds).unwrap_or_else(|e| panic!("{name} {label}: {e}"));
            println!("{name} {label}: {} ops, interpreter {:.2} ms", g.op_count(), t0.elapsed().as_secs_f64() * 1e3);
            assert_eq!(outs.len(), expected.len(), "{name}: output count");
            for (out_name, t) in &outs {
                let want = &expected
                    .iter()
                    .find(|(n, _)| n == out_name)
                    .unwrap_or_else(|| panic!("{name}: no expected {out_name}"))
                    .1;
                common::compare(t, want, RTOL, ATOL).unwrap_or_else(|e| panic!("{name} {label} {out_name}: {e}"));
            }
        }
    }
}

#[test]
fn external_data_is_equivalent_to_inline_weights() {
    let root = common::repo_root().join("models/tiny");
    let a = edgec::onnx::load_model(&root.join("llama/model.onnx")).unwrap();
    let b = edgec::onnx::load_model(&root.join("llama_ext/model.onnx")).unwrap();
    assert_eq!(edgec::ir::text::render(&a), edgec::ir::text::render(&b));
}

/// A weight stored past the 2 GiB mark of an external-data file (a sparse file,
/// so it costs no disk) imports and computes: offsets are 64-bit and the data is
/// memory-mapped, never read into a protobuf.
#[test]
fn external_data_beyond_2gib() {
    use edgec::onnx::proto::{tensor_proto::DataLocation, StringStringEntryProto};
    use prost::Message;
    let dir = std::env::temp_dir().join(format!("edgec-big-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let offset: u64 = (5 << 29) + 64; // 2.5 GiB + 64
    let weights = [1.5f32, -2.0, 0.25, 8.0];
    let bytes: Vec<u8> = weights.iter().flat_map(|w| w.to_le_bytes()).collect();
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::File::create(dir.join("weights.bin")).unwrap();
        f.set_len(offset + 4096).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.write_all(&bytes).unwrap();
    }
    let entry = |k: &str, v: String| StringStringEntryProto { key: Some(k.into()), value: Some(v) };
    let mut w = common::f32_initializer("w", &[4], &[]);
    w.data_location = Some(DataLocation::External as i32);
    w.external_data = vec![
        entry("location", "weights.bin".into()),
        entry("offset", offset.to_string()),
        entry("length", "16".into()),
    ];
    let m = common::model(
        17,
        vec![common::node("Add", &["x", "w"], &["y"])],
        vec![common::value_info("x", 1, &["4"])],
        vec![common::value_info("y", 1, &["4"])],
        vec![w],
    );
    std::fs::write(dir.join("model.onnx"), m.encode_to_vec()).unwrap();
    let g = edgec::onnx::load_model(&dir.join("model.onnx"));
    let x = edgec::ir::Tensor::from_vec(vec![4], vec![1.0f32; 4]);
    let out = g.and_then(|g| Interpreter::new(&g)?.run(&[("x".into(), x)]));
    std::fs::remove_dir_all(&dir).unwrap();
    let out = out.unwrap();
    assert_eq!(out[0].1.as_slice::<f32>().unwrap(), &[2.5, -1.0, 1.25, 9.0]);
}

//! insta snapshots of the IR text before and after each pass of the default
//! pipeline, on the tiny fixture models (and the KV-cache decoder of models/tiny-lm) and on a
//! small hand-built graph with the shape-arithmetic pattern exporters emit. Every pass but the
//! fusions is a pure rewrite, so the interpreter's outputs must stay bit-identical across it;
//! a fusion computes the fused op in f64 at once, so its outputs may move by float
//! reassociation: rtol 1e-5, atol 1e-5 (see tests/fusion.rs).

mod common;

use edgec::interp::Interpreter;
use edgec::ir::{text::render, Graph, Tensor};
use edgec::passes::{pass_by_name, DEFAULT_PIPELINE};
use prost::Message;

fn outputs(g: &Graph, feeds: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    Interpreter::new(g).unwrap().run(feeds).unwrap()
}

/// Snapshots the imported graph, then the graph after each pipeline pass.
fn snapshot_pipeline(name: &str, mut g: Graph, feeds: &[(String, Tensor)]) {
    let reference = outputs(&g, feeds);
    insta::assert_snapshot!(format!("{name}@0-import"), render(&g));
    for (i, pass_name) in DEFAULT_PIPELINE.iter().enumerate() {
        let pass = pass_by_name(pass_name).unwrap();
        pass.run(&mut g).unwrap();
        edgec::ir::verify::verify(&g).unwrap();
        insta::assert_snapshot!(format!("{name}@{}-{pass_name}", i + 1), render(&g));
        let got = outputs(&g, feeds);
        if pass_name.starts_with("fuse-") {
            for ((n, a), (_, b)) in got.iter().zip(&reference) {
                common::compare(a, b, 1e-5, 1e-5).unwrap_or_else(|e| panic!("{name} {n} after {pass_name}: {e}"));
            }
        } else {
            assert!(got == reference, "{name}: outputs changed across pass {pass_name}");
        }
    }
}

#[test]
fn tiny_model_pipelines() {
    for (name, dir) in common::tiny_models() {
        if name == "llama_ext" {
            continue; // identical graph to llama (checked in tiny_models.rs)
        }
        let g = edgec::onnx::load_model(&dir.join("model.onnx")).unwrap();
        snapshot_pipeline(&name, g, &common::read_npy_dir(&dir.join("inputs")));
    }
}

/// SmolLM2's decoder-with-past layout (GQA, past keys concatenated to the new ones).
#[test]
fn tiny_lm_decoder_pipeline() {
    let g = edgec::onnx::load_model(&common::repo_root().join("models/tiny-lm/decoder_with_past.onnx")).unwrap();
    let feeds = common::tiny_lm_feeds(&g);
    snapshot_pipeline("tiny_lm_decoder", g, &feeds);
}

/// x[batch, seq, 64] -> split heads with a Shape/Gather/Concat/Reshape chain,
/// with a duplicated Shape (CSE), a dead branch (DCE), a constant Transpose and
/// Range over a static shape (constant folding).
#[test]
fn exporter_pattern() {
    use common::{f32_initializer, node, value_info};
    let mut nodes = vec![
        node("Shape", &["x"], &["s"]),
        node("Shape", &["x"], &["s_dup"]),
        node("Gather", &["s", "zero"], &["b"]),
        node("Gather", &["s_dup", "one"], &["t"]),
        node("Unsqueeze", &["b", "axes0"], &["b1"]),
        node("Unsqueeze", &["t", "axes0"], &["t1"]),
        node("Concat", &["b1", "t1", "heads"], &["target"]),
        node("Reshape", &["x", "target"], &["xh"]),
        node("Transpose", &["w"], &["wt"]),
        node("Shape", &["w"], &["ws"]),
        node("Gather", &["ws", "zero"], &["w0"]),
        node("Range", &["zero", "w0", "one"], &["r"]),
        node("Cast", &["r"], &["rf"]),
        node("MatMul", &["xh", "wt"], &["y0"]),
        node("Add", &["y0", "rf"], &["y"]),
        node("Neg", &["x"], &["unused"]),
    ];
    nodes[6].attribute.push(common::attr_int("axis", 0));
    nodes[8].attribute.push(common::attr_ints("perm", &[1, 0]));
    nodes[12].attribute.push(common::attr_int("to", 1));
    let i64_init = |name: &str, dims: &[i64], v: &[i64]| edgec::onnx::proto::TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(7),
        int64_data: v.to_vec(),
        ..Default::default()
    };
    let w: Vec<f32> = (0..64).map(|i| i as f32 / 64.0 - 0.5).collect();
    let m = common::model(
        17,
        nodes,
        vec![value_info("x", 1, &["batch", "seq", "64"])],
        vec![value_info("y", 1, &["batch", "seq", "4", "4"])],
        vec![
            i64_init("zero", &[], &[0]),
            i64_init("one", &[], &[1]),
            i64_init("axes0", &[1], &[0]),
            i64_init("heads", &[2], &[4, 16]),
            f32_initializer("w", &[4, 16], &w),
        ],
    );
    let g = edgec::onnx::load_model_bytes(m.encode_to_vec().into(), None, "exporter_pattern").unwrap();
    let x: Vec<f32> = (0..2 * 3 * 64).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
    let feeds = vec![("x".to_string(), Tensor::from_vec(vec![2, 3, 64], x))];
    snapshot_pipeline("exporter_pattern", g, &feeds);
}

/// `logits-last` (`edgec compile --logits last`; not in the default pipeline), after the default
/// pipeline, on the tiny-lm decoder (tied lm_head read through a Transpose, RMSNorm, KV cache) and
/// on GPT-2 (tied wte copy, LayerNorm): a Slice of the last position feeds the lm_head and
/// `logits` is [batch_size,1,vocab]. The interpreter's logits are the last row of the full
/// graph's (the slice only drops rows the projection computed independently), the presents are
/// untouched, and a second run changes nothing.
#[test]
fn logits_last_pass() {
    let root = common::repo_root();
    let lm = edgec::onnx::load_model(&root.join("models/tiny-lm/decoder_with_past.onnx")).unwrap();
    let lm_feeds = common::tiny_lm_feeds(&lm);
    let gpt2 = edgec::onnx::load_model(&root.join("models/tiny/gpt2/model.onnx")).unwrap();
    let gpt2_feeds = common::read_npy_dir(&root.join("models/tiny/gpt2/inputs"));
    for (name, mut g, feeds) in [("tiny_lm_decoder", lm, lm_feeds), ("gpt2", gpt2, gpt2_feeds)] {
        for p in DEFAULT_PIPELINE {
            pass_by_name(p).unwrap().run(&mut g).unwrap();
        }
        let full = outputs(&g, &feeds);
        let pass = pass_by_name("logits-last").unwrap();
        assert_eq!(pass.run(&mut g).unwrap().changed, 1, "{name}");
        edgec::ir::verify::verify(&g).unwrap();
        insta::assert_snapshot!(format!("{name}@13-logits-last"), render(&g));
        let last = outputs(&g, &feeds);
        for ((n, a), (_, b)) in last.iter().zip(&full) {
            if n != "logits" {
                assert!(a == b, "{name}: {n} changed");
                continue;
            }
            let (batch, seq, vocab) = (b.shape[0], b.shape[1], b.shape[2]);
            assert_eq!(a.shape, vec![batch, 1, vocab], "{name}");
            let (a, b) = (a.as_slice::<f32>().unwrap(), b.as_slice::<f32>().unwrap());
            for i in 0..batch {
                let want = &b[(i * seq + seq - 1) * vocab..(i * seq + seq) * vocab];
                assert!(&a[i * vocab..(i + 1) * vocab] == want, "{name}: batch {i}: not the full graph's last row");
            }
        }
        assert_eq!(pass.run(&mut g).unwrap().changed, 0, "{name}: a second run");
    }
    // Graphs without a `logits` output are refused by name.
    let mut bert = edgec::onnx::load_model(&root.join("models/tiny/bert/model.onnx")).unwrap();
    let e = pass_by_name("logits-last").unwrap().run(&mut bert).unwrap_err().to_string();
    assert!(e.contains("no output named `logits`") && e.contains("last_hidden_state, pooler_output"), "{e}");
}

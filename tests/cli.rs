//! The `edgec` binary as a user runs it.

mod common;

use std::process::Command;

fn edgec(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_edgec")).args(args).current_dir(common::repo_root()).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn help_describes_every_command() {
    let (ok, out, _) = edgec(&["--help"]);
    assert!(ok);
    assert!(out.contains("inspect") && out.contains("run"), "{out}");
    for cmd in ["inspect", "run"] {
        let (ok, out, _) = edgec(&[cmd, "--help"]);
        assert!(ok && out.contains("Usage: edgec"), "{cmd}: {out}");
    }
    let (_, out, _) = edgec(&["run", "--help"]);
    assert!(out.contains("NAME=FILE.npy") && out.contains("--output-dir"), "{out}");
}

#[test]
fn inspect_prints_the_ir_and_passes() {
    let (ok, out, err) = edgec(&["inspect", "models/tiny/llama/model.onnx"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("graph \"main_graph\" opset=18"), "{out}");
    assert!(out.contains("input %") && out.contains("\"input_ids\": i64[batch_size,sequence_length]"), "{out}");
    assert!(out.contains("output \"logits\" = %") && out.contains("f32[batch_size,sequence_length,128]"));

    let (ok, out, err) =
        edgec(&["inspect", "models/tiny/llama/model.onnx", "--passes", "default", "--after", "const-fold"]);
    assert!(ok, "{err}");
    assert!(out.contains("# after const-fold (changed "), "{out}");

    let (ok, _, err) = edgec(&["inspect", "models/tiny/llama/model.onnx", "--passes", "fold-everything"]);
    assert!(!ok && err.contains("unknown pass 'fold-everything'") && err.contains("const-fold"), "{err}");
}

#[test]
fn run_writes_npy_outputs_that_match_onnxruntime() {
    let dir = std::env::temp_dir().join(format!("edgec-cli-{}", std::process::id()));
    let m = "models/tiny/bert";
    let (ok, out, err) = edgec(&[
        "run",
        &format!("{m}/model.onnx"),
        "--input",
        &format!("input_ids={m}/inputs/input_ids.npy"),
        "-i",
        &format!("attention_mask={m}/inputs/attention_mask.npy"),
        "-i",
        &format!("token_type_ids={m}/inputs/token_type_ids.npy"),
        "--output-dir",
        dir.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("last_hidden_state: f32[2, 7, 64]"), "{out}");
    for name in ["last_hidden_state", "pooler_output"] {
        let got = edgec::npy::read_npy(&dir.join(format!("{name}.npy"))).unwrap();
        let want = edgec::npy::read_npy(&common::repo_root().join(format!("{m}/expected/{name}.npy"))).unwrap();
        common::compare(&got, &want, 1e-4, 1e-5).unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn run_reports_missing_files_and_bad_specs() {
    let (ok, _, err) = edgec(&["run", "no/such/model.onnx"]);
    assert!(!ok && err.contains("no/such/model.onnx"), "{err}");
    let (ok, _, err) = edgec(&["run", "models/tiny/qdq_mlp/model.onnx", "-i", "x"]);
    assert!(!ok && err.contains("must be NAME=FILE.npy"), "{err}");
    let (ok, _, err) = edgec(&["run", "models/tiny/qdq_mlp/model.onnx", "-i", "x=missing.npy"]);
    assert!(!ok && err.contains("missing.npy"), "{err}");
}

//! Weight quantization (`--quantize`): the IR it writes (insta snapshot), its error against the
//! f32 model on the reference interpreter. (MatMulNBits as onnxruntime runs it: the nbits_mlp
//! fixture in tiny_models.rs; native code for quantized models: codegen.rs.)

mod common;

use edgec::interp::Interpreter;
use edgec::ir::{text::render, Graph, Tensor};
use edgec::passes::quantize::Quantize;
use edgec::passes::{pass_by_name, Pass, PassManager};

fn tiny_llama() -> (Graph, Vec<(String, Tensor)>) {
    let dir = common::repo_root().join("models/tiny/llama");
    let mut g = edgec::onnx::load_model(&dir.join("model.onnx")).unwrap();
    PassManager::default_pipeline().run(&mut g, &mut |_, _, _| {}).unwrap();
    (g, common::read_npy_dir(&dir.join("inputs")))
}

fn quantized(g: &Graph, scheme: &str, keep: &[&str]) -> Graph {
    let mut q = g.clone();
    let pass = Quantize::new(scheme.parse().unwrap(), keep.iter().map(|s| s.to_string()).collect());
    pass.run(&mut q).unwrap();
    pass_by_name("dce").unwrap().run(&mut q).unwrap();
    edgec::ir::verify::verify(&q).unwrap();
    q
}

/// ||got - want|| / ||want|| over the first output (the logits).
fn relative_error(g: &Graph, reference: &[(String, Tensor)], feeds: &[(String, Tensor)]) -> f64 {
    let got = Interpreter::new(g).unwrap().run(feeds).unwrap();
    let (a, b) = (got[0].1.to_f64_vec(), reference[0].1.to_f64_vec());
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

#[test]
fn quantized_llama_snapshot() {
    let (g, _) = tiny_llama();
    insta::assert_snapshot!("llama@quantize-int4", render(&quantized(&g, "int4", &["lm_head"])));
}

/// More bits, smaller error; every scheme stays close to f32 on the tiny Llama's logits.
#[test]
fn quantization_error_is_bounded_and_ordered() {
    let (g, feeds) = tiny_llama();
    let reference = Interpreter::new(&g).unwrap().run(&feeds).unwrap();
    let err = |scheme: &str| relative_error(&quantized(&g, scheme, &[]), &reference, &feeds);
    let (e8, e4, e4a, e4g) = (err("int8"), err("int4"), err("int4:g32:asym"), err("int4:channel"));
    println!(
        "relative logit error: int8 {e8:.2e}, int4 g32 {e4:.2e}, int4 g32 asym {e4a:.2e}, int4 per channel {e4g:.2e}"
    );
    // Random tiny weights amplify rounding (SmolLM2 itself is measured by `edgec eval`).
    assert!(e8 < 0.03, "int8 {e8}");
    assert!(e4 < 0.3 && e4a < 0.3, "int4 {e4} {e4a}");
    assert!(e8 < e4 / 4.0, "int8 {e8} vs int4 {e4}");
    assert!(e4 < e4g, "groups of 32 {e4} should beat one scale per channel {e4g}");
    // Keeping every matmul in f32 is exact.
    let kept = quantized(&g, "int4", &["*"]);
    assert_eq!(relative_error(&kept, &reference, &feeds), 0.0);
}

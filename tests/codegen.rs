//! Native code: every tiny model compiled with Cranelift, run on this machine through the runtime
//! crate, and under qemu-user for aarch64 and riscv64 (via the C harness in tests/harness), against
//! the reference interpreter.

mod common;

use edgec::codegen::{compile, run_model, Options};
use edgec::interp::Interpreter;
use edgec::ir::{Graph, Tensor};
use edgec::passes::PassManager;

/// Generated kernels vs the interpreter (f64 inside): rtol 1e-4, atol 1e-5 near zero.
const RTOL: f64 = 1e-4;
const ATOL: f64 = 1e-5;

fn load(dir: &std::path::Path) -> Graph {
    let mut g = edgec::onnx::load_model(&dir.join("model.onnx")).unwrap();
    PassManager::default_pipeline().run(&mut g, &mut |_, _, _| {}).unwrap();
    g
}

fn opts(target: &str) -> Options {
    Options { target: target.into(), max_seq: Some(64), max_batch: Some(4), ..Default::default() }
}

fn reference(g: &Graph, feeds: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    Interpreter::new(g).unwrap().run(feeds).unwrap()
}

#[test]
fn tiny_models_native_host() {
    for (name, dir) in common::tiny_models() {
        let g = load(&dir);
        let feeds = common::read_npy_dir(&dir.join("inputs"));
        let want = reference(&g, &feeds);
        for target in ["host", "x86_64"] {
            let c = compile(&g, &opts(target)).unwrap_or_else(|e| panic!("{name} {target}: {e}"));
            let model = edgec_runtime::Model::from_bytes(&c.artifact().unwrap()).unwrap();
            let got = run_model(&model, &feeds).unwrap_or_else(|e| panic!("{name} {target}: {e}"));
            println!(
                "{name} {target}: {} kernels, code {} B, weights {} B, arena {} B, compile {:.0} ms",
                c.stats.kernels, c.stats.code_bytes, c.stats.weight_bytes, c.stats.arena_bytes, c.stats.compile_ms
            );
            for ((n, g), (_, w)) in got.iter().zip(&want) {
                common::compare(g, w, RTOL, ATOL).unwrap_or_else(|e| panic!("{name} {target} {n}: {e}"));
            }
        }
    }
}

//! The block-sparse matmul kernel (`--sparse`, codegen/spmm.rs) against the reference interpreter:
//! pruned weights through MatMul, a fused bias + Relu epilogue, Gemm with transB, batched A,
//! partial panels and units, several row counts and thread counts; natively and under qemu
//! (aarch64 NEON, riscv64 scalar and with V). Also which weights `--sparse auto` picks.

mod common;

use common::qemu::{run_jobs, CrossArch};
use edgec::codegen::plan::SparseMode;
use edgec::codegen::{compile, run_model, Options};
use edgec::interp::Interpreter;
use edgec::ir::{Graph, Tensor};
use edgec::passes::PassManager;

/// Generated kernels vs the interpreter (f64 inside).
const RTOL: f64 = 1e-4;
const ATOL: f64 = 1e-5;

/// Deterministic weights with the fraction `sparsity` zeroed (a pseudo-random mask).
fn pruned(n: usize, sparsity: f64, seed: u64) -> Vec<f32> {
    let w = common::noise(n, seed);
    let mask = common::noise(n, seed + 1);
    w.iter().zip(&mask).map(|(&v, &m)| if ((m as f64) + 1.0) / 2.0 < sparsity { 0.0 } else { v }).collect()
}

fn import(m: edgec::onnx::proto::ModelProto) -> Graph {
    let mut g = edgec::onnx::import_model(m, None, "test").unwrap();
    // Both halves of the default pipeline, as `edgec compile` runs them: MatMul + Add + Relu
    // becomes one MatMulAct with an epilogue.
    let (a, b) = PassManager::default_around_quantize();
    a.run(&mut g, &mut |_, _, _| {}).unwrap();
    b.run(&mut g, &mut |_, _, _| {}).unwrap();
    g
}

/// x[b, m, 37] @ W1[37, 30] + bias, Relu (fused) → y1; the same x through Gemm(transB) with
/// W2[21, 37] and C → y2. N = 30 and 21 leave partial four-column panels and 16-column units.
fn graph(sparsity: f64) -> Graph {
    let (k, n1, n2) = (37usize, 30usize, 21usize);
    let mut gemm = common::node("Gemm", &["x2", "w2", "c2"], &["y2"]);
    gemm.attribute.push(common::attr_int("transB", 1));
    import(common::model(
        17,
        vec![
            common::node("MatMul", &["x", "w1"], &["t"]),
            common::node("Add", &["t", "b1"], &["u"]),
            common::node("Relu", &["u"], &["y1"]),
            common::node("Reshape", &["x", "shape"], &["x2"]),
            gemm,
        ],
        vec![common::value_info("x", 1, &["2", "m", "37"])],
        vec![common::value_info("y1", 1, &["2", "m", "30"]), common::value_info("y2", 1, &["rows", "21"])],
        vec![
            common::f32_initializer("w1", &[k as i64, n1 as i64], &pruned(k * n1, sparsity, 11)),
            common::f32_initializer("b1", &[n1 as i64], &common::noise(n1, 12)),
            common::f32_initializer("w2", &[n2 as i64, k as i64], &pruned(k * n2, sparsity, 13)),
            common::f32_initializer("c2", &[n2 as i64], &common::noise(n2, 14)),
            edgec::onnx::proto::TensorProto {
                name: Some("shape".into()),
                dims: vec![2],
                data_type: Some(7),
                int64_data: vec![-1, k as i64],
                ..Default::default()
            },
        ],
    ))
}

fn opts(target: &str, sparse: SparseMode) -> Options {
    Options { target: target.into(), max_seq: Some(64), max_batch: Some(4), sparse, ..Default::default() }
}

fn input(m: usize) -> Tensor {
    Tensor::from_vec(vec![2, m, 37], common::noise(2 * m * 37, 100 + m as u64))
}

fn reference(g: &Graph, x: &Tensor) -> Vec<Tensor> {
    Interpreter::new(g).unwrap().run(&[("x".into(), x.clone())]).unwrap().into_iter().map(|(_, t)| t).collect()
}

/// Rows 1 (decode: the paired accumulators, odd and even entry counts), 4 + 1 (an MR tile and a
/// single row) and 9.
const ROWS: [usize; 3] = [1, 5, 9];

#[test]
fn sparse_kernel_matches_the_interpreter_natively() {
    let g = graph(0.9);
    for target in ["host", "x86_64"] {
        let c = compile(&g, &opts(target, SparseMode::Always)).unwrap();
        assert_eq!(c.stats.sparse_weights, 2, "{target}: both weights block-sparse");
        assert!(c.stats.sparse_bytes < c.stats.sparse_dense_bytes);
        let mut model = edgec_runtime::Model::from_bytes(&c.artifact().unwrap()).unwrap();
        for m in ROWS {
            let x = input(m);
            let want = reference(&g, &x);
            for threads in [1, 2, 3] {
                model.set_threads(threads);
                let got = run_model(&model, &[("x".into(), x.clone())]).unwrap();
                for ((name, got), want) in got.iter().zip(&want) {
                    common::compare(got, want, RTOL, ATOL)
                        .unwrap_or_else(|e| panic!("{target} m={m} {threads} threads {name}: {e}"));
                }
            }
        }
    }
}

#[test]
fn sparse_kernel_matches_the_interpreter_under_qemu() {
    let g = graph(0.9);
    for arch in CrossArch::CROSS {
        // riscv64 without V runs the scalar form of the kernel, with V the vector one.
        for features in [None, (arch == CrossArch::Riscv64).then_some("+v")] {
            let mut jobs = Vec::new();
            let mut wants = Vec::new();
            for m in ROWS {
                let x = input(m);
                let want = reference(&g, &x);
                let mut o = opts(arch.name(), SparseMode::Always);
                o.features = features.map(str::to_string);
                for chunk in [None, Some(1)] {
                    let name = format!("m={m} chunk {chunk:?}");
                    let mut job =
                        common::native::cross_job_with(&name, &g, std::slice::from_ref(&x), &want, &o).unwrap();
                    job.parallel_chunk = chunk;
                    jobs.push(job);
                    wants.push((name, want.clone()));
                }
            }
            let cpu = features.and(arch.cpu_all_features());
            let outs = run_jobs(arch, &jobs, cpu).unwrap_or_else(|e| panic!("{}: {e}", arch.name()));
            for ((name, want), raw) in wants.iter().zip(outs) {
                let got = common::native::decode_outputs(&raw, want).unwrap();
                for (i, (g, w)) in got.iter().zip(want).enumerate() {
                    common::compare(g, w, RTOL, ATOL)
                        .unwrap_or_else(|e| panic!("{} {features:?} {name} output {i}: {e}", arch.name()));
                }
            }
        }
    }
}

/// The tiny Llama pruned by the real pass (`--prune unstructured:0.9`): every pruned layer goes
/// block-sparse under `auto` (SwiGLU included), and the outputs match the interpreter on the same
/// pruned graph, natively and under qemu.
#[test]
fn pruned_tiny_llama_runs_block_sparse() {
    let path = common::repo_root().join("models/tiny-lm/model.onnx");
    let mut g = edgec::onnx::load_model(&path).unwrap();
    PassManager::parse("const-fold,cse,dce").unwrap().run(&mut g, &mut |_, _, _| {}).unwrap();
    let spec = edgec::passes::prune::PruneSpec::parse("unstructured:0.9").unwrap();
    let report = edgec::passes::prune::prune(&mut g, &spec, "unstructured:0.9", None).unwrap();
    let (a, b) = PassManager::default_around_quantize();
    a.run(&mut g, &mut |_, _, _| {}).unwrap();
    b.run(&mut g, &mut |_, _, _| {}).unwrap();
    let feeds = common::tiny_lm_feeds(&g);
    let want = Interpreter::new(&g).unwrap().run(&feeds).unwrap();
    let c = compile(&g, &opts("host", SparseMode::Auto)).unwrap();
    // Per block, fuse-qkv merges q, k, v into one weight and fuse-swiglu gate and up: 4 weights.
    assert_eq!(report.layers.len(), 14);
    assert_eq!(c.stats.sparse_weights, 8, "every pruned weight of the 2 blocks");
    let dense = compile(&g, &opts("host", SparseMode::Off)).unwrap();
    assert_eq!(dense.stats.sparse_weights, 0);
    assert!(c.stats.weight_bytes < dense.stats.weight_bytes * 3 / 4);
    let model = edgec_runtime::Model::from_bytes(&c.artifact().unwrap()).unwrap();
    let got = run_model(&model, &feeds).unwrap();
    for ((name, got), (_, want)) in got.iter().zip(&want) {
        common::compare(got, want, RTOL, ATOL).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let inputs: Vec<Tensor> = feeds.iter().map(|(_, t)| t.clone()).collect();
    let want: Vec<Tensor> = want.into_iter().map(|(_, t)| t).collect();
    for arch in CrossArch::CROSS {
        let o = opts(arch.name(), SparseMode::Auto);
        let job = common::native::cross_job_with("pruned tiny llama", &g, &inputs, &want, &o).unwrap();
        let outs = run_jobs(arch, &[job], None).unwrap_or_else(|e| panic!("{}: {e}", arch.name()));
        let got = common::native::decode_outputs(&outs[0], &want).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            common::compare(g, w, RTOL, ATOL).unwrap_or_else(|e| panic!("{} output {i}: {e}", arch.name()));
        }
    }
}

/// `auto` takes the sparse form only where it measured faster (at most 0.8 of the dense bytes):
/// 90 % unstructured yes; 50 % and dense weights no; `off` never; `always` whenever some
/// four-column row is all zero.
#[test]
fn auto_picks_sparse_only_when_it_pays() {
    for (sparsity, auto, always) in [(0.9, 2, 2), (0.5, 0, 2), (0.0, 0, 0)] {
        let g = graph(sparsity);
        for (mode, want) in [(SparseMode::Auto, auto), (SparseMode::Off, 0), (SparseMode::Always, always)] {
            let c = compile(&g, &opts("host", mode)).unwrap();
            assert_eq!(c.stats.sparse_weights, want, "sparsity {sparsity}, {mode:?}");
            assert!(c.stats.sparse_bytes <= c.stats.sparse_dense_bytes);
        }
    }
}

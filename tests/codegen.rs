//! Native code: every tiny model compiled with Cranelift, run on this machine through the runtime
//! crate, and under qemu-user for aarch64 and riscv64 (via the C harness in tests/harness), against
//! the reference interpreter.

mod common;

use common::qemu::{run_jobs, CrossArch};
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

/// The model as is, and with its matmul weights quantized (int8 per channel, int4 in groups of
/// 32, and asymmetric int4 in groups of 48 so K leaves a partial block; each also with int8
/// activations): native code for MatMulNBits against the interpreter's reading of the same
/// quantized graph. With int8 activations an activation that lands within float rounding of a
/// rounding boundary may round the other way in one of the two, which later layers carry on: those
/// variants are held to |diff| <= 0.05 (the kernels themselves are checked exactly in quantize.rs).
fn variants(name: &str, g: Graph) -> Vec<(String, Graph)> {
    let mut out = vec![(name.to_string(), g.clone())];
    for scheme in ["int8", "int4", "int4:g48:asym", "w8a8", "w4a8", "w4a8:g48:asym"] {
        let mut q = g.clone();
        let pass = edgec::passes::quantize::Quantize::new(scheme.parse().unwrap(), vec![]);
        let stats = edgec::passes::Pass::run(&pass, &mut q).unwrap();
        if stats.changed > 0 {
            out.push((format!("{name} {scheme}"), q));
        }
    }
    out
}

fn tolerance(variant: &str) -> (f64, f64) {
    if variant.contains("a8") {
        (0.0, 0.05)
    } else {
        (RTOL, ATOL)
    }
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
        for (name, g) in variants(&name, load(&dir)) {
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
                    common::compare(g, w, tolerance(&name).0, tolerance(&name).1)
                        .unwrap_or_else(|e| panic!("{name} {target} {n}: {e}"));
                }
            }
        }
    }
}

/// Inputs of a tiny model in the graph's order.
fn ordered_inputs(g: &Graph, feeds: &[(String, Tensor)]) -> Vec<Tensor> {
    common::native::input_names(g)
        .iter()
        .map(|n| feeds.iter().find(|(f, _)| f == n).unwrap_or_else(|| panic!("no input {n}")).1.clone())
        .collect()
}

/// The tiny models compiled for aarch64 and riscv64 (baseline, and with every feature the format
/// knows under a CPU that has them), run under qemu, against the interpreter.
#[test]
fn tiny_models_under_qemu() {
    for arch in CrossArch::CROSS {
        for features in [None, Some(if arch == CrossArch::Aarch64 { "+dotprod,+i8mm,+fp16" } else { "+v,+zba,+zbb" })] {
            let mut jobs = Vec::new();
            let mut wants = Vec::new();
            for (name, dir) in common::tiny_models() {
                for (name, g) in variants(&name, load(&dir)) {
                    let feeds = common::read_npy_dir(&dir.join("inputs"));
                    let inputs = ordered_inputs(&g, &feeds);
                    let want: Vec<Tensor> = reference(&g, &feeds).into_iter().map(|(_, t)| t).collect();
                    let mut o = common::native::test_options(arch.name());
                    o.features = features.map(str::to_string);
                    let job = common::native::cross_job_with(&name, &g, &inputs, &want, &o).unwrap();
                    jobs.push(job);
                    wants.push((name, want));
                }
            }
            let cpu = features.and(arch.cpu_all_features());
            let outs = run_jobs(arch, &jobs, cpu).unwrap_or_else(|e| panic!("{}: {e}", arch.name()));
            for ((name, want), raw) in wants.iter().zip(outs) {
                let got = common::native::decode_outputs(&raw, want).unwrap();
                for (i, (g, w)) in got.iter().zip(want).enumerate() {
                    common::compare(g, w, tolerance(name).0, tolerance(name).1)
                        .unwrap_or_else(|e| panic!("{name} on {} {features:?} output {i}: {e}", arch.name()));
                }
            }
            println!("{} {features:?}: {} tiny models match the interpreter under qemu", arch.name(), wants.len());
        }
    }
}

/// `--emit obj`: the object and header link into a C program (cross-compiled with gcc) that runs
/// the model under qemu (natively for x86_64), with embedded weights and with a sidecar file.
#[test]
fn emitted_objects_link_and_run() {
    let dir = common::repo_root().join("models/tiny/llama");
    let g = load(&dir);
    let feeds = common::read_npy_dir(&dir.join("inputs"));
    let inputs = ordered_inputs(&g, &feeds);
    let want: Vec<Tensor> = reference(&g, &feeds).into_iter().map(|(_, t)| t).collect();
    let work = common::repo_root().join(format!("target/cross/obj-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    for (i, t) in inputs.iter().enumerate() {
        std::fs::write(work.join(format!("in{i}.bin")), t.to_le_bytes()).unwrap();
    }
    for (arch, sidecar) in [
        (CrossArch::Host, false),
        (CrossArch::Host, true),
        (CrossArch::Aarch64, false),
        (CrossArch::Aarch64, true),
        (CrossArch::Riscv64, false),
    ] {
        let target = if arch == CrossArch::Host { "x86_64" } else { arch.name() };
        let c = compile(&g, &common::native::test_options(target)).unwrap();
        let obj = work.join(format!("{}-{sidecar}.o", arch.name()));
        let files = edgec::codegen::object::write(&c, &obj, "model", sidecar).unwrap();
        assert_eq!(files.len(), if sidecar { 3 } else { 2 }, "{files:?}");
        let header = obj.with_extension("h");
        let exe = work.join(format!("run-{}-{sidecar}", arch.name()));
        let harness = common::repo_root().join("tests/harness/obj_main.c");
        let mut cc = std::process::Command::new(arch.compiler());
        if sidecar {
            cc.arg(format!("-DWEIGHTS_PATH=\"{}\"", obj.with_extension("weights.bin").display()));
        }
        let status = cc
            .args(["-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-static"])
            .arg(format!("-DMODEL_HEADER=\"{}\"", header.display()))
            .arg(&harness)
            .arg(&obj)
            .arg("-o")
            .arg(&exe)
            .status()
            .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup-cross.sh)", arch.compiler()));
        assert!(status.success(), "linking the {} object failed", arch.name());
        // Symbols from the input shapes, in the header's order.
        let mut symbols = vec![0i64; c.meta.symbols.len()];
        for (m, t) in c.meta.inputs.iter().zip(&inputs) {
            for (d, &size) in m.shape.iter().zip(&t.shape) {
                if let Some(s) = d.as_symbol() {
                    symbols[c.meta.symbol_index(s).unwrap()] = size as i64;
                }
            }
        }
        let mut cmd = match arch.qemu() {
            Some((qemu, sysroot)) => {
                let mut c = std::process::Command::new(qemu);
                c.arg("-L").arg(sysroot).arg(&exe);
                c
            }
            None => std::process::Command::new(&exe),
        };
        cmd.args(symbols.iter().map(|s| s.to_string()));
        cmd.args((0..inputs.len()).map(|i| work.join(format!("in{i}.bin"))));
        for (i, w) in want.iter().enumerate() {
            cmd.arg(work.join(format!("out{i}-{}.bin", arch.name())));
            cmd.arg((w.len() * w.dtype().size()).to_string());
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}: {}", arch.name(), String::from_utf8_lossy(&out.stderr));
        for (i, w) in want.iter().enumerate() {
            let raw = std::fs::read(work.join(format!("out{i}-{}.bin", arch.name()))).unwrap();
            let got = Tensor::from_le_bytes(w.dtype(), w.shape.clone(), &raw).unwrap();
            common::compare(&got, w, RTOL, ATOL).unwrap_or_else(|e| panic!("{} output {i}: {e}", arch.name()));
        }
        println!(
            "{} (weights {}): linked object ({} bytes code) matches the interpreter",
            arch.name(),
            if sidecar { "in a sidecar file" } else { "embedded" },
            c.code.len()
        );
    }
    std::fs::remove_dir_all(&work).ok();
}

/// A graph whose matmuls are big enough to be split into `parallel_for` units: batched MatMul with
/// broadcast weights, a Gemm with transposed B and bias, and a vector-matrix product, with column
/// counts that leave ragged panels.
fn parallel_matmul_graph() -> Graph {
    use common::{f32_initializer, model, node, value_info};
    let w1: Vec<f32> = (0..96 * 200).map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0).collect();
    let w2: Vec<f32> = (0..200 * 130).map(|i| ((i * 13 % 97) as f32 - 48.0) / 128.0).collect();
    let b2: Vec<f32> = (0..130).map(|i| i as f32 / 10.0).collect();
    let w3: Vec<f32> = (0..130 * 1030).map(|i| ((i * 7 % 89) as f32 - 44.0) / 256.0).collect();
    let mut gemm = node("Gemm", &["flat", "w2", "b2"], &["g"]);
    gemm.attribute.push(common::attr_int("transB", 1));
    let m = model(
        17,
        vec![
            node("MatMul", &["x", "w1"], &["h"]),
            node("Reshape", &["h", "shape"], &["flat"]),
            gemm,
            node("ReduceMean", &["g", "axes"], &["v"]),
            node("MatMul", &["v", "w3"], &["y"]),
        ],
        vec![value_info("x", 1, &["3", "40", "96"])],
        vec![value_info("y", 1, &[]), value_info("g", 1, &[])],
        vec![
            f32_initializer("w1", &[96, 200], &w1),
            f32_initializer("w2", &[130, 200], &w2),
            f32_initializer("b2", &[130], &b2),
            f32_initializer("w3", &[130, 1030], &w3),
            edgec::onnx::proto::TensorProto {
                name: Some("shape".into()),
                dims: vec![2],
                data_type: Some(7),
                int64_data: vec![120, 200],
                ..Default::default()
            },
            edgec::onnx::proto::TensorProto {
                name: Some("axes".into()),
                dims: vec![1],
                data_type: Some(7),
                int64_data: vec![0],
                ..Default::default()
            },
        ],
    );
    let bytes = prost::Message::encode_to_vec(&m);
    let mut g = edgec::onnx::load_model_bytes(bytes.into(), None, "parallel matmul").unwrap();
    PassManager::default_pipeline().run(&mut g, &mut |_, _, _| {}).unwrap();
    g
}

/// Matmuls split over `parallel_for`: the runtime's thread pool (1, 2 and 3 threads) and, under
/// qemu, a callback that runs the units in reverse chunks, all match the interpreter.
#[test]
fn parallel_matmul_matches_interpreter() {
    let g = parallel_matmul_graph();
    let x: Vec<f32> = (0..3 * 40 * 96).map(|i| ((i * 31 % 53) as f32 - 26.0) / 32.0).collect();
    let x = Tensor::from_vec(vec![3, 40, 96], x);
    let feeds = vec![("x".to_string(), x.clone())];
    let want: Vec<Tensor> = reference(&g, &feeds).into_iter().map(|(_, t)| t).collect();
    let c = compile(&g, &opts("host")).unwrap();
    let mut model = edgec_runtime::Model::from_bytes(&c.artifact().unwrap()).unwrap();
    for threads in [1, 2, 3] {
        model.set_threads(threads);
        let got = run_model(&model, &feeds).unwrap();
        for ((n, g), w) in got.iter().zip(&want) {
            common::compare(g, w, RTOL, ATOL).unwrap_or_else(|e| panic!("{threads} threads, {n}: {e}"));
        }
    }
    for arch in CrossArch::CROSS {
        let mut jobs = Vec::new();
        for chunk in [None, Some(1), Some(5)] {
            let mut job = common::native::cross_job(
                &format!("chunk {chunk:?}"),
                &g,
                std::slice::from_ref(&x),
                &want,
                arch.name(),
            )
            .unwrap();
            job.parallel_chunk = chunk;
            jobs.push(job);
        }
        let outs = run_jobs(arch, &jobs, None).unwrap();
        for (job, raw) in jobs.iter().zip(outs) {
            let got = common::native::decode_outputs(&raw, &want).unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                common::compare(g, w, RTOL, ATOL)
                    .unwrap_or_else(|e| panic!("{} {} output {i}: {e}", arch.name(), job.name));
            }
        }
    }
}

/// `lm::Session` on the tiny Llama (a full-sequence graph: re-run over the whole text each step):
/// greedy tokens and logits match the interpreter run on the same growing text.
#[test]
fn greedy_generation_matches_the_interpreter() {
    use edgec_runtime::lm::{Sampling, Session};
    let dir = common::repo_root().join("models/tiny/llama");
    let g = load(&dir);
    let c = compile(&g, &opts("host")).unwrap();
    let model = edgec_runtime::Model::from_bytes(&c.artifact().unwrap()).unwrap();
    let mut session = Session::new(&model).unwrap();
    assert!(session.spec().cache.is_empty());
    let prompt = [5u32, 17, 3, 99];
    let mut got = Vec::new();
    let stats = session.generate(&prompt, 6, &[], &Sampling::default(), &mut |t| {
        got.push(t);
        true
    });
    assert_eq!(stats.unwrap().generated, 6);
    // The same loop on the interpreter.
    let interp = Interpreter::new(&g).unwrap();
    let mut text: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    let mut want = Vec::new();
    for _ in 0..6 {
        let n = text.len();
        let feeds = vec![
            ("input_ids".to_string(), Tensor::from_vec(vec![1, n], text.clone())),
            ("attention_mask".to_string(), Tensor::from_vec(vec![1, n], vec![1i64; n])),
            ("position_ids".to_string(), Tensor::from_vec(vec![1, n], (0..n as i64).collect::<Vec<_>>())),
        ];
        let out = interp.run(&feeds).unwrap();
        let logits = out[0].1.to_f64_vec();
        let vocab = out[0].1.shape[2];
        let last = &logits[(n - 1) * vocab..];
        let next = (0..vocab).max_by(|&a, &b| last[a].total_cmp(&last[b])).unwrap();
        want.push(next as u32);
        text.push(next as i64);
    }
    assert_eq!(got, want);
    assert_eq!(session.tokens().len(), prompt.len() + 6);
}

/// The KV-cache path on a tiny Llama in SmolLM2's export layout (models/tiny-lm, written by
/// models/make_tiny_lm.py): greedy decoding through the compiled decoder-with-past (prefill with
/// an empty cache, then one token per step) gives the same tokens as the compiled full-sequence
/// graph and as the no-mask variant, and its last logits match the full graph's.
#[test]
fn kv_cache_decoding_matches_full_sequence() {
    use edgec_runtime::lm::{Sampling, Session};
    let dir = common::repo_root().join("models/tiny-lm");
    let compiled = |name: &str| {
        let mut g = edgec::onnx::load_model(&dir.join(name)).unwrap();
        PassManager::default_pipeline().run(&mut g, &mut |_, _, _| {}).unwrap();
        let c = compile(&g, &opts("host")).unwrap_or_else(|e| panic!("{name}: {e}"));
        edgec_runtime::Model::from_bytes(&c.artifact().unwrap()).unwrap()
    };
    let prompt = [3u32, 14, 15, 92, 65, 35];
    let greedy = |model: &edgec_runtime::Model| {
        let mut s = Session::new(model).unwrap();
        let mut out = Vec::new();
        s.generate(&prompt, 12, &[], &Sampling::default(), &mut |t| {
            out.push(t);
            true
        })
        .unwrap();
        let logits = s.feed(&[]).unwrap();
        (out, logits, s.spec().cache.len())
    };
    let (past_tokens, past_logits, layers) = greedy(&compiled("decoder_with_past.onnx"));
    assert_eq!(layers, 2, "the decoder's cache inputs were not recognised");
    let (full_tokens, full_logits, _) = greedy(&compiled("model.onnx"));
    let (nomask_tokens, _, _) = greedy(&compiled("model_nomask.onnx"));
    assert_eq!(past_tokens, full_tokens);
    assert_eq!(nomask_tokens, full_tokens);
    let max_diff = past_logits.iter().zip(&full_logits).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(max_diff < 1e-4, "last logits differ by {max_diff}");
}

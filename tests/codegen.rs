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
    // The matmul fusions run after quantization (`variants`), as in `edgec compile`.
    PassManager::default_around_quantize().0.run(&mut g, &mut |_, _, _| {}).unwrap();
    g
}

fn fuse_matmuls(mut g: Graph) -> Graph {
    PassManager::default_around_quantize().1.run(&mut g, &mut |_, _, _| {}).unwrap();
    g
}

/// The model as is, and with its matmul weights quantized (int8 per channel, int4 in groups of
/// 32, and asymmetric int4 in groups of 48 so K leaves a partial block; each also with int8
/// activations): native code for MatMulNBits against the interpreter's reading of the same
/// quantized graph. With int8 activations an activation that lands within float rounding of a
/// rounding boundary may round the other way in one of the two, which later layers carry on: those
/// variants are held to |diff| <= 0.05 (the kernels themselves are checked exactly in quantize.rs).
fn variants(name: &str, g: Graph) -> Vec<(String, Graph)> {
    let mut out = vec![(name.to_string(), fuse_matmuls(g.clone()))];
    for scheme in ["int8", "int4", "int4:g48:asym", "w8a8", "w4a8", "w4a8:g48:asym"] {
        let mut q = g.clone();
        let pass = edgec::passes::quantize::Quantize::new(scheme.parse().unwrap(), vec![]);
        let stats = edgec::passes::Pass::run(&pass, &mut q).unwrap();
        if stats.changed > 0 {
            out.push((format!("{name} {scheme}"), fuse_matmuls(q)));
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
    let g = fuse_matmuls(load(&dir));
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
        let exe = link_object(arch, &c, &work, &format!("{}-{sidecar}", arch.name()), "obj_main.c", sidecar);
        // Symbols from the input shapes, in the header's order.
        let mut symbols = vec![0i64; c.meta.symbols.len()];
        for (m, t) in c.meta.inputs.iter().zip(&inputs) {
            for (d, &size) in m.shape.iter().zip(&t.shape) {
                if let Some(s) = d.as_symbol() {
                    symbols[c.meta.symbol_index(s).unwrap()] = size as i64;
                }
            }
        }
        let mut cmd = command(arch, &exe);
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

/// Writes `c` as an object (`NAME.o` + `NAME.h` in `work`, weights embedded or in a sidecar file)
/// and links it with the C program `tests/harness/HARNESS` for `arch`; returns the executable.
fn link_object(
    arch: CrossArch,
    c: &edgec::codegen::Compiled,
    work: &std::path::Path,
    name: &str,
    harness: &str,
    sidecar: bool,
) -> std::path::PathBuf {
    let obj = work.join(format!("{name}.o"));
    let files = edgec::codegen::object::write(c, &obj, "model", sidecar).unwrap();
    assert_eq!(files.len(), if sidecar { 3 } else { 2 }, "{files:?}");
    let exe = work.join(format!("run-{name}"));
    let mut cc = std::process::Command::new(arch.compiler());
    if sidecar {
        cc.arg(format!("-DWEIGHTS_PATH=\"{}\"", obj.with_extension("weights.bin").display()));
    }
    let status = cc
        .args(["-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-static"])
        .arg(format!("-DMODEL_HEADER=\"{}\"", obj.with_extension("h").display()))
        .arg(common::repo_root().join("tests/harness").join(harness))
        .arg(&obj)
        .arg("-o")
        .arg(&exe)
        .status()
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup-cross.sh)", arch.compiler()));
    assert!(status.success(), "linking the {} object with {harness} failed", arch.name());
    exe
}

/// The executable, under qemu-user for a foreign architecture.
fn command(arch: CrossArch, exe: &std::path::Path) -> std::process::Command {
    match arch.qemu() {
        Some((qemu, sysroot)) => {
            let mut c = std::process::Command::new(qemu);
            c.arg("-L").arg(sysroot).arg(exe);
            c
        }
        None => std::process::Command::new(exe),
    }
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
    let g = fuse_matmuls(load(&dir));
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

/// `--logits last` (passes/logits_last.rs, run after quantization and fusion as `edgec compile`
/// does) on the tiny LMs: the Llama and GPT-2 fixtures (GPT-2's lm_head is a tied copy of wte) and
/// the tiny-lm decoder with past and full-sequence graph (lm_head tied through a Transpose of the
/// embedding), in f32, int4 and w4a8. The last-position artifact's logits [batch, 1, vocab] are the
/// last row of the full artifact's [batch, seq, vocab] (rtol 1e-4) and match the interpreter's
/// on the sliced graph (the native-vs-interpreter tolerance), greedy generation through `lm::Session` gives the same
/// tokens, and asking a last-position artifact for every position's logits (`feed_all`, `nll`:
/// what `edgec eval` does) is an error, before anything runs.
#[test]
fn logits_last_matches_the_full_artifact() {
    use edgec_runtime::lm::{Sampling, Session};
    use edgec_runtime::RunError;
    let root = common::repo_root();
    let models = [
        ("llama", root.join("models/tiny/llama/model.onnx")),
        ("gpt2", root.join("models/tiny/gpt2/model.onnx")),
        ("tiny-lm past", root.join("models/tiny-lm/decoder_with_past.onnx")),
        ("tiny-lm full", root.join("models/tiny-lm/model.onnx")),
    ];
    let artifact = |g: &Graph| {
        let c = compile(g, &opts("host")).unwrap();
        edgec_runtime::Model::from_bytes(&c.artifact().unwrap()).unwrap()
    };
    let logits = |outs: &[(String, Tensor)]| outs.iter().find(|(n, _)| n == "logits").unwrap().1.clone();
    for (model, path) in models {
        let mut base = edgec::onnx::load_model(&path).unwrap();
        PassManager::default_around_quantize().0.run(&mut base, &mut |_, _, _| {}).unwrap();
        let feeds = match path.parent().unwrap().join("inputs") {
            dir if dir.exists() => common::read_npy_dir(&dir),
            _ => common::tiny_lm_feeds(&base),
        };
        for scheme in ["f32", "int4", "w4a8"] {
            let name = format!("{model} {scheme}");
            let mut full = base.clone();
            if scheme != "f32" {
                let pass = edgec::passes::quantize::Quantize::new(scheme.parse().unwrap(), vec![]);
                edgec::passes::Pass::run(&pass, &mut full).unwrap();
            }
            let full = fuse_matmuls(full);
            let mut last = full.clone();
            let stats = edgec::passes::pass_by_name("logits-last").unwrap().run(&mut last).unwrap();
            assert_eq!(stats.changed, 1, "{name}");
            let (full_model, last_model) = (artifact(&full), artifact(&last));
            let want = logits(&run_model(&full_model, &feeds).unwrap());
            let got = logits(&run_model(&last_model, &feeds).unwrap());
            let interp = logits(&reference(&last, &feeds));
            let (b, s, v) = (want.shape[0], want.shape[1], want.shape[2]);
            assert_eq!(got.shape, vec![b, 1, v], "{name}");
            let rows: Vec<f32> = (0..b)
                .flat_map(|i| want.as_slice::<f32>().unwrap()[(i * s + s - 1) * v..(i * s + s) * v].to_vec())
                .collect();
            let rows = Tensor::from_vec(vec![b, 1, v], rows);
            // The same rows through the lm_head kernel for one row per batch instead of the prompt
            // shape (a different tile, so float sums may associate differently).
            common::compare(&got, &rows, RTOL, ATOL).unwrap_or_else(|e| panic!("{name}: vs the full artifact: {e}"));
            let (rtol, atol) = tolerance(scheme);
            common::compare(&got, &interp, rtol, atol).unwrap_or_else(|e| panic!("{name}: vs the interpreter: {e}"));
            if model == "gpt2" && scheme != "f32" {
                continue; // one generation check per model is enough
            }
            let greedy = |m: &edgec_runtime::Model| {
                let mut session = Session::new(m).unwrap();
                let mut out = Vec::new();
                session
                    .generate(&[3, 14, 15, 92, 65, 35], 10, &[], &Sampling::default(), &mut |t| {
                        out.push(t);
                        true
                    })
                    .unwrap();
                out
            };
            assert_eq!(greedy(&last_model), greedy(&full_model), "{name}: greedy tokens");
            let mut session = Session::new(&last_model).unwrap();
            assert!(session.spec().last_position_only, "{name}");
            assert!(!Session::new(&full_model).unwrap().spec().last_position_only, "{name}");
            let e = session.feed_all(&[3, 14, 15]).unwrap_err();
            assert!(matches!(e, RunError::LogitsRows { positions: 3, rows: 1 }), "{name}: {e}");
            assert!(e.to_string().contains("--logits all"), "{e}");
            assert!(session.tokens().is_empty(), "{name}: the failed call ran the model");
            assert!(matches!(session.nll(&[3, 14, 15]), Err(RunError::LogitsRows { .. })), "{name}");
            // One position is one row: fine either way.
            assert_eq!(session.feed_all(&[3]).unwrap().0.len(), v, "{name}");
            // No position at all: the slice from the end would read before its buffer, so the
            // artifact requires a sequence length of at least 1 and the runtime refuses the run.
            if model.starts_with("tiny-lm") {
                let empty: Vec<(String, Tensor)> = feeds
                    .iter()
                    .map(|(n, t)| {
                        let mut shape = t.shape.clone();
                        if n == "input_ids" || n == "position_ids" {
                            shape[1] = 0;
                        }
                        if n == "attention_mask" && model.ends_with("full") {
                            shape[1] = 0;
                        }
                        let keep: usize = shape.iter().product();
                        let t = match t.dtype() {
                            edgec::ir::DType::I64 => {
                                Tensor::from_vec(shape, t.as_slice::<i64>().unwrap()[..keep].to_vec())
                            }
                            _ => Tensor::from_vec(shape, t.as_slice::<f32>().unwrap()[..keep].to_vec()),
                        };
                        (n.clone(), t)
                    })
                    .collect();
                let e = run_model(&last_model, &empty).unwrap_err().to_string();
                assert!(e.contains("needs `sequence_length` >= 1, but it is 0"), "{name}: {e}");
                assert!(!format!("{:?}", full_model.meta().requires).contains("sequence_length"), "{name}");
            }
        }
    }
}

/// The tiny-lm decoder with past, compiled with the KV cache in the arena (codegen/kv_cache.rs).
fn tiny_lm_decoder(target: &str, max_seq: u64) -> edgec::codegen::Compiled {
    let mut g = edgec::onnx::load_model(&common::repo_root().join("models/tiny-lm/decoder_with_past.onnx")).unwrap();
    PassManager::default_pipeline().run(&mut g, &mut |_, _, _| {}).unwrap();
    let c = compile(&g, &Options { max_seq: Some(max_seq), ..opts(target) }).unwrap();
    assert_eq!(c.meta.kv_cache.len(), 4, "2 layers x (key, value) should live in the arena");
    c
}

/// Feeds for one step of the tiny-lm decoder: ids at positions past.., a full mask.
fn step_feeds(ids: &[u32], past: usize) -> Vec<(String, edgec_runtime::Tensor)> {
    use edgec_runtime::Tensor as T;
    let n = ids.len();
    let ids: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    let pos: Vec<i64> = (past..past + n).map(|p| p as i64).collect();
    vec![
        ("input_ids".into(), T::from_slice(vec![1, n], &ids).unwrap()),
        ("attention_mask".into(), T::from_slice(vec![1, past + n], &vec![1i64; past + n]).unwrap()),
        ("position_ids".into(), T::from_slice(vec![1, n], &pos).unwrap()),
    ]
}

/// The step's feeds as `run_cached` takes them: `None` at the cache inputs.
fn cached_views<'t>(
    meta: &edgec_runtime::Meta,
    feeds: &'t [(String, edgec_runtime::Tensor)],
) -> Vec<Option<edgec_runtime::TensorView<'t>>> {
    meta.inputs.iter().map(|m| feeds.iter().find(|(n, _)| *n == m.name).map(|(_, t)| t.view())).collect()
}

/// The same steps through the two calling conventions of one artifact, each on its own loaded
/// model: `run_cached` (the cache never leaves the arena) and `run` with the past passed in and
/// the present handed back (the code copies both): identical logits and presents at every step.
/// Then the guards: another cache's run invalidates the first, and a text longer than the
/// capacity is refused.
#[test]
fn kv_cache_in_arena_matches_explicit_past() {
    use edgec_runtime::{DType, Model, RunError, Tensor as T};
    let c = tiny_lm_decoder("host", 16);
    let bytes = c.artifact().unwrap();
    let (stateful, plain) = (Model::from_bytes(&bytes).unwrap(), Model::from_bytes(&bytes).unwrap());
    let meta = stateful.meta().clone();
    let mut cache = stateful.kv_cache().unwrap();
    let mut past: Vec<T> =
        meta.kv_cache.iter().map(|s| edgec_runtime::lm::empty_past(&stateful, s.input, s.axis).unwrap()).collect();
    let mut len = 0;
    for (step, ids) in [&[3u32, 14, 15, 92][..], &[65], &[35, 8], &[97]].into_iter().enumerate() {
        let feeds = step_feeds(ids, len);
        let got = stateful.run_cached(&cached_views(&meta, &feeds), &mut cache).unwrap();
        let views: Vec<edgec_runtime::TensorView> = cached_views(&meta, &feeds)
            .into_iter()
            .enumerate()
            .map(|(i, v)| v.unwrap_or_else(|| past[meta.kv_cache.iter().position(|s| s.input == i).unwrap()].view()))
            .collect();
        let mut want = plain.run(&views).unwrap();
        for (o, g) in got.iter().enumerate() {
            match g {
                Some(g) => assert_eq!(g.bytes(), want[o].bytes(), "step {step}: output {}", meta.outputs[o].name),
                None => assert!(meta.kv_cache.iter().any(|s| s.output == o)),
            }
        }
        len += ids.len();
        assert_eq!(cache.len(), len);
        past = meta
            .kv_cache
            .iter()
            .map(|s| std::mem::replace(&mut want[s.output], T::zeros(DType::F32, vec![0]).unwrap()))
            .collect();
        assert_eq!(past[0].shape()[2], len);
    }
    // Another cache's run takes the arena: the first cache is refused, not silently wrong.
    let mut other = stateful.kv_cache().unwrap();
    stateful.run_cached(&cached_views(&meta, &step_feeds(&[7], 0)), &mut other).unwrap();
    let e = stateful.run_cached(&cached_views(&meta, &step_feeds(&[7], len)), &mut cache).unwrap_err();
    assert_eq!(e, RunError::KvCacheLost);
    // Capacity 16: 9 positions held + 8 new is one too many (the mask's total length, bounded by
    // the same --max-seq, is refused first; a model without it would hit the capacity check).
    let mut full = stateful.kv_cache().unwrap();
    stateful.run_cached(&cached_views(&meta, &step_feeds(&[1; 9], 0)), &mut full).unwrap();
    let e = stateful.run_cached(&cached_views(&meta, &step_feeds(&[1; 8], 9)), &mut full).unwrap_err();
    assert!(
        matches!(&e, RunError::SymbolRange { symbol, value: 17, max: 16 } if symbol == "total_sequence_length")
            || matches!(e, RunError::KvCapacity { len: 17, capacity: 16, .. }),
        "{e}"
    );
    // A cache input given a buffer is refused too (the arena holds it).
    let feeds = step_feeds(&[1], 0);
    let mut views = cached_views(&meta, &feeds);
    let k = meta.kv_cache[0].input;
    views[k] = Some(past[0].view());
    assert!(matches!(stateful.run_cached(&views, &mut full), Err(RunError::KvInput { .. })));
}

/// The C API's cached steps (`edgec_model_run_cached`, tiny-lm decoder loaded from a file) give
/// the bytes `Model::run_cached` gives; NULL caches, missing buffers and models without a cache
/// are errors with a message.
#[test]
fn kv_cache_through_the_c_api() {
    use edgec_runtime::capi::*;
    use std::ffi::{c_char, CStr, CString};
    let c = tiny_lm_decoder("host", 16);
    let path = std::env::temp_dir().join(format!("edgec-capi-kv-{}.edgec", std::process::id()));
    std::fs::write(&path, c.artifact().unwrap()).unwrap();
    let reference = edgec_runtime::Model::load(&path).unwrap();
    let meta = reference.meta().clone();
    let mut want_cache = reference.kv_cache().unwrap();
    let mut err = [0 as c_char; 256];
    let msg = |e: &[c_char]| unsafe { CStr::from_ptr(e.as_ptr()) }.to_string_lossy().into_owned();
    let cpath = CString::new(path.to_str().unwrap()).unwrap();
    // Every input in order; the cache inputs with NULL data.
    let in_descs = |feeds: &[(String, edgec_runtime::Tensor)]| -> Vec<EdgecTensor> {
        let desc = |m: &edgec_runtime::TensorMeta| {
            let t = feeds.iter().find(|(n, _)| *n == m.name).map(|(_, t)| t);
            let mut d = EdgecTensor {
                dtype: m.dtype.code(),
                rank: m.shape.len() as u32,
                shape: [0; EDGEC_MAX_RANK],
                data: t.map_or(std::ptr::null_mut(), |t| t.bytes().as_ptr() as *mut u8),
                byte_len: t.map_or(0, |t| t.bytes().len()),
            };
            if let Some(t) = t {
                d.shape.iter_mut().zip(t.shape()).for_each(|(d, &s)| *d = s as i64);
            }
            d
        };
        meta.inputs.iter().map(desc).collect()
    };
    unsafe {
        let model = edgec_model_load(cpath.as_ptr(), err.as_mut_ptr(), err.len());
        assert!(!model.is_null(), "{}", msg(&err));
        let cache = edgec_kv_cache_new(model, err.as_mut_ptr(), err.len());
        assert!(!cache.is_null(), "{}", msg(&err));
        let step = |ins: &mut [EdgecTensor], outs: &mut [EdgecTensor], err: &mut [c_char]| {
            let (ni, no) = (ins.len(), outs.len());
            edgec_model_run_cached(
                model,
                cache,
                ins.as_mut_ptr(),
                ni,
                outs.as_mut_ptr(),
                no,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        let mut len = 0;
        for ids in [&[3u32, 14, 15, 92][..], &[65], &[35, 8]] {
            let feeds = step_feeds(ids, len);
            let want = reference.run_cached(&cached_views(&meta, &feeds), &mut want_cache).unwrap();
            let mut ins = in_descs(&feeds);
            let mut bufs: Vec<Vec<u8>> =
                want.iter().map(|t| vec![0u8; t.as_ref().map_or(0, |t| t.bytes().len())]).collect();
            let mut outs: Vec<EdgecTensor> = bufs
                .iter_mut()
                .map(|b| EdgecTensor {
                    dtype: 0,
                    rank: 0,
                    shape: [0; EDGEC_MAX_RANK],
                    data: if b.is_empty() { std::ptr::null_mut() } else { b.as_mut_ptr() },
                    byte_len: b.len(),
                })
                .collect();
            let rc = step(&mut ins, &mut outs, &mut err);
            assert_eq!(rc, 0, "{}", msg(&err));
            for (o, w) in want.iter().enumerate() {
                if let Some(w) = w {
                    assert_eq!(bufs[o], w.bytes(), "output {}", meta.outputs[o].name);
                    assert_eq!(outs[o].rank as usize, w.shape().len());
                }
            }
            len += ids.len();
            assert_eq!(edgec_kv_cache_len(cache), len);
        }
        // A short logits buffer: an error naming the sizes (the step was taken, as it says).
        let feeds = step_feeds(&[1], len);
        let mut ins = in_descs(&feeds);
        let mut small = [0u8; 8];
        let mut outs: Vec<EdgecTensor> = meta
            .outputs
            .iter()
            .map(|_| EdgecTensor {
                dtype: 0,
                rank: 0,
                shape: [0; EDGEC_MAX_RANK],
                data: small.as_mut_ptr(),
                byte_len: small.len(),
            })
            .collect();
        let rc = step(&mut ins, &mut outs, &mut err);
        assert!(
            rc == -1 && msg(&err).contains("the buffer has 8 (the step was taken: the cache holds 8 positions)"),
            "{}",
            msg(&err)
        );
        assert_eq!(edgec_kv_cache_len(cache), len + 1);
        let rc = edgec_model_run_cached(
            model,
            std::ptr::null_mut(),
            std::ptr::null(),
            0,
            std::ptr::null_mut(),
            0,
            err.as_mut_ptr(),
            err.len(),
        );
        assert_eq!((rc, msg(&err).as_str()), (-1, "cache is NULL"));
        let rc = edgec_model_run_cached(
            model,
            cache,
            std::ptr::null(),
            0,
            std::ptr::null_mut(),
            0,
            err.as_mut_ptr(),
            err.len(),
        );
        assert!(rc == -1 && msg(&err).contains("outputs given"), "{}", msg(&err));
        edgec_kv_cache_free(cache);
        edgec_model_free(model);
        assert!(edgec_kv_cache_new(std::ptr::null(), err.as_mut_ptr(), err.len()).is_null());
        assert_eq!(msg(&err), "model is NULL");
        assert_eq!(edgec_kv_cache_len(std::ptr::null()), 0);
        edgec_kv_cache_free(std::ptr::null_mut());
    }
    std::fs::remove_file(&path).ok();
}

/// The C programs of a device without the Rust runtime: tests/harness/lm_generate.c linked with
/// the tiny-lm decoder as an `--emit obj` object for x86_64, aarch64 and riscv64 (qemu-user),
/// decoding greedily with NULL past/present pointers (cache in the arena) and with its own
/// swapped buffers: both give the tokens `lm::Session` gives on this machine.
#[test]
fn kv_cache_in_arena_under_qemu() {
    use edgec_runtime::lm::{Sampling, Session};
    let prompt = [3u32, 14, 15, 92, 65, 35];
    let host = tiny_lm_decoder("host", 64);
    let model = edgec_runtime::Model::from_bytes(&host.artifact().unwrap()).unwrap();
    let mut want = Vec::new();
    Session::new(&model)
        .unwrap()
        .generate(&prompt, 8, &[], &Sampling::default(), &mut |t| {
            want.push(t);
            true
        })
        .unwrap();
    let dims = |name: &str| host.meta.outputs.iter().find(|t| t.name == name).unwrap().shape.clone();
    let (logits, present) = (dims("logits"), dims("present.0.key"));
    let args = [&logits[2], &present[1], &present[3]].map(|d| d.as_constant().unwrap().to_string());
    let work = common::repo_root().join(format!("target/cross/kv-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    for arch in [CrossArch::Host, CrossArch::Aarch64, CrossArch::Riscv64] {
        let target = if arch == CrossArch::Host { "x86_64" } else { arch.name() };
        let c = tiny_lm_decoder(target, 64);
        let exe = link_object(arch, &c, &work, &format!("lm-{}", arch.name()), "lm_generate.c", true);
        for in_arena in [true, false] {
            let mut cmd = command(arch, &exe);
            if in_arena {
                cmd.arg("--kv-in-arena");
            }
            cmd.args(&args).arg("8").args(prompt.iter().map(|t| t.to_string()));
            let out = cmd.output().unwrap();
            assert!(out.status.success(), "{}: {}", arch.name(), String::from_utf8_lossy(&out.stderr));
            let got: Vec<u32> =
                String::from_utf8_lossy(&out.stdout).split_whitespace().map(|t| t.parse().unwrap()).collect();
            assert_eq!(got, want, "{} (kv in arena: {in_arena})", arch.name());
        }
    }
    std::fs::remove_dir_all(&work).ok();
}

/// Nodes alike but for where their tensors live share one generated function, called with their
/// own buffers: two chained 64x64 matmuls with different weights (and their Relus) compile to one
/// group function and one task each, and still compute x @ w1 -> relu -> @ w2 -> relu exactly as the
/// interpreter does (a shared function that kept the first node's weights would not).
#[test]
fn alike_nodes_share_one_function() {
    use common::{f32_initializer, model, node, value_info};
    let w1: Vec<f32> = (0..64 * 64).map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0).collect();
    let w2: Vec<f32> = (0..64 * 64).map(|i| ((i * 13 % 97) as f32 - 48.0) / 128.0).collect();
    let m = model(
        17,
        vec![
            node("MatMul", &["x", "w1"], &["h1"]),
            node("Relu", &["h1"], &["r1"]),
            node("MatMul", &["r1", "w2"], &["h2"]),
            node("Relu", &["h2"], &["y"]),
        ],
        vec![value_info("x", 1, &["40", "64"])],
        vec![value_info("y", 1, &[])],
        vec![f32_initializer("w1", &[64, 64], &w1), f32_initializer("w2", &[64, 64], &w2)],
    );
    let bytes = prost::Message::encode_to_vec(&m);
    let mut g = edgec::onnx::load_model_bytes(bytes.into(), None, "alike").unwrap();
    PassManager::default_pipeline().run(&mut g, &mut |_, _, _| {}).unwrap();
    let x: Vec<f32> = (0..40 * 64).map(|i| ((i * 31 % 53) as f32 - 26.0) / 32.0).collect();
    let feeds = vec![("x".to_string(), Tensor::from_vec(vec![40, 64], x))];
    let want: Vec<Tensor> = reference(&g, &feeds).into_iter().map(|(_, t)| t).collect();
    let c = compile(&g, &opts("host")).unwrap();
    let names: Vec<&str> = c.functions.iter().map(|f| f.2.as_str()).collect();
    assert_eq!(names.len(), 3, "one matmul(+relu) group, its task and the entry: {names:?}");
    assert!(names.iter().filter(|n| n.ends_with("(+1_alike)")).count() == 2, "{names:?}");
    let model = edgec_runtime::Model::from_bytes(&c.artifact().unwrap()).unwrap();
    let got = run_model(&model, &feeds).unwrap();
    common::compare(&got[0].1, &want[0], RTOL, ATOL).unwrap();
}

/// The register tiles of every target (`codegen::tiles`: f32 6 x 2 vectors on x86_64, 6 x 4 on
/// aarch64 and riscv64 with V, scalar without; integer-dot tiles of 2 or 4 rows; weight-only
/// tiles of 8 or 16 columns) and their edges:
/// a packed f32 weight with a fused bias, a product of two activations (unpacked B) and the same
/// model with w4a8 and weight-only int4 weights, plus a packed f32 weight whose K is split into
/// blocks (`Tiles::k_block`: partial sums through the output, bias and Relu after the last), at
/// row counts that leave every remainder (1, 5, 7, 13 rows), natively
/// and under qemu (aarch64 with and without SDOT, riscv64 with and without V) against the
/// interpreter.
#[test]
fn register_tiles_match_the_interpreter_on_every_target() {
    use common::{f32_initializer, model, node, value_info};
    use edgec::codegen::{target::Target, tiles::Tiles};
    // An odd K leaves a single k step after x86's two-step loop.
    let (k, n, n2) = (41usize, 40usize, 20usize);
    // A K long enough to be split into blocks (whole ones and a partial one), and an N that leaves a
    // partial panel and two scalar columns.
    let tiles = Tiles::for_target(&Target::parse("host", None, None).unwrap());
    let k3 = tiles.k_blocked_from.next_multiple_of(tiles.k_block) + 76;
    let n3 = 42usize;
    let w: Vec<f32> = common::noise(k * n, 7);
    let bias: Vec<f32> = common::noise(n, 8);
    let w3: Vec<f32> = common::noise(k3 * n3, 10).iter().map(|v| v / 16.0).collect();
    let m = model(
        17,
        vec![
            node("MatMul", &["x", "w"], &["h"]),
            node("Add", &["h", "bias"], &["y1"]),
            node("MatMul", &["x", "b"], &["y2"]),
            node("MatMul", &["x3", "w3"], &["h3"]),
            node("Add", &["h3", "bias3"], &["g3"]),
            node("Relu", &["g3"], &["y3"]),
        ],
        vec![
            value_info("x", 1, &["rows", "41"]),
            value_info("b", 1, &["41", "20"]),
            value_info("x3", 1, &["rows", &k3.to_string()]),
        ],
        vec![value_info("y1", 1, &[]), value_info("y2", 1, &[]), value_info("y3", 1, &[])],
        vec![
            f32_initializer("w", &[k as i64, n as i64], &w),
            f32_initializer("bias", &[n as i64], &bias),
            f32_initializer("w3", &[k3 as i64, n3 as i64], &w3),
            f32_initializer("bias3", &[n3 as i64], &common::noise(n3, 11)),
        ],
    );
    let bytes = prost::Message::encode_to_vec(&m);
    let mut g = edgec::onnx::load_model_bytes(bytes.into(), None, "tiles").unwrap();
    PassManager::default_around_quantize().0.run(&mut g, &mut |_, _, _| {}).unwrap();
    let mut graphs = vec![("f32", fuse_matmuls(g.clone()))];
    for scheme in ["w4a8", "int4:g16:asym"] {
        let mut q = g.clone();
        let pass = edgec::passes::quantize::Quantize::new(scheme.parse().unwrap(), vec![]);
        assert_eq!(edgec::passes::Pass::run(&pass, &mut q).unwrap().changed, 2);
        graphs.push((scheme, fuse_matmuls(q)));
    }
    let b = Tensor::from_vec(vec![k, n2], common::noise(k * n2, 9));
    let cases: Vec<(String, &Graph, Vec<Tensor>, Vec<Tensor>)> = graphs
        .iter()
        .flat_map(|(label, g)| {
            [1usize, 5, 7, 13].map(|rows| {
                let x = Tensor::from_vec(vec![rows, k], common::noise(rows * k, rows as u64));
                let x3 = Tensor::from_vec(vec![rows, k3], common::noise(rows * k3, 100 + rows as u64));
                let feeds =
                    vec![("x".to_string(), x.clone()), ("b".to_string(), b.clone()), ("x3".to_string(), x3.clone())];
                let want = reference(g, &feeds).into_iter().map(|(_, t)| t).collect();
                (format!("{label} {rows} rows"), g, vec![x, b.clone(), x3], want)
            })
        })
        .collect();
    let check = |name: &str, got: &[Tensor], want: &[Tensor]| {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            common::compare(g, w, RTOL, ATOL).unwrap_or_else(|e| panic!("{name} output {i}: {e}"));
        }
    };
    for target in ["host", "x86_64"] {
        for (name, g, inputs, want) in &cases {
            let (_, got) = common::native::run_native(g, inputs, target).unwrap();
            check(&format!("{target} {name}"), &got, want);
        }
    }
    for arch in CrossArch::CROSS {
        for features in [None, Some(arch.kernel_feature())] {
            let mut o = common::native::test_options(arch.name());
            o.features = features.map(str::to_string);
            let jobs: Vec<_> = cases
                .iter()
                .map(|(name, g, inputs, want)| common::native::cross_job_with(name, g, inputs, want, &o).unwrap())
                .collect();
            let outs = run_jobs(arch, &jobs, features.and(arch.cpu_all_features())).unwrap();
            for ((name, _, _, want), raw) in cases.iter().zip(outs) {
                let got = common::native::decode_outputs(&raw, want).unwrap();
                check(&format!("{} {features:?} {name}", arch.name()), &got, want);
            }
        }
    }
}

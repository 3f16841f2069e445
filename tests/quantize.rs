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

/// One MatMulNBits with int8 activations per scheme, fed directly (so the activation rounding sees
/// bit-identical inputs): the integer-dot kernels (host with pmaddubsw, x86_64 baseline, aarch64
/// under qemu with and without SDOT, riscv64 with RVV) and the float fallback (riscv64 scalar)
/// against the interpreter, tight.
#[test]
fn int8_activation_kernels_match_the_interpreter() {
    use common::qemu::{run_jobs, CrossArch};
    use edgec::ir::{DType, Dim, GraphOutput, Op, TensorType, Value, ValueRef};
    let (k, n, rows) = (80, 40, 5);
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    let w: Vec<f32> = (0..k * n).map(|_| next()).collect();
    let x: Vec<f32> = (0..rows * k).map(|_| next() * 3.0).collect();
    for scheme in ["w8a8", "w4a8", "w4a8:g16:asym", "int8:g32:asym:a8", "w4a8:g48", "w4a8:g64", "w4a8:g128:asym"] {
        let mut g = Graph::new("t", 17);
        let ty = TensorType::new(DType::F32, vec![Dim::sym("rows"), Dim::fixed(k as i64)]);
        let xin = g.add_node(Op::Input { index: 0 }, "x".into(), &[], vec![Value { name: "x".into(), ty }]);
        g.inputs.push(xin);
        let wc = g.add_const("w".into(), &Tensor::from_vec(vec![k, n], w.clone()));
        let out_ty = TensorType::new(DType::F32, vec![Dim::sym("rows"), Dim::fixed(n as i64)]);
        let x_ref = ValueRef { node: xin, slot: 0 };
        let y = Value { name: "y".into(), ty: out_ty };
        let mm = g.add_node(Op::MatMul, "mm".into(), &[Some(x_ref), Some(wc)], vec![y]);
        g.outputs.push(GraphOutput { name: "y".into(), value: ValueRef { node: mm, slot: 0 } });
        let q = quantized(&g, scheme, &[]);
        let feeds = vec![("x".to_string(), Tensor::from_vec(vec![rows, k], x.clone()))];
        let want = Interpreter::new(&q).unwrap().run(&feeds).unwrap();
        for target in ["host", "x86_64"] {
            let c = edgec::codegen::compile(&q, &common::native::test_options(target)).unwrap();
            let model = edgec_runtime::Model::from_bytes(&c.artifact().unwrap()).unwrap();
            let got = edgec::codegen::run_model(&model, &feeds).unwrap();
            common::compare(&got[0].1, &want[0].1, 1e-5, 1e-5).unwrap_or_else(|e| panic!("{scheme} {target}: {e}"));
        }
        // Baseline and with every feature (aarch64: SDOT with dotprod; riscv64: RVV).
        for arch in CrossArch::CROSS {
            for features in [None, Some(if arch == CrossArch::Aarch64 { "+dotprod" } else { "+v" })] {
                let inputs = vec![feeds[0].1.clone()];
                let wants = vec![want[0].1.clone()];
                let mut o = common::native::test_options(arch.name());
                o.features = features.map(str::to_string);
                let job = common::native::cross_job_with(scheme, &q, &inputs, &wants, &o).unwrap();
                let raw = run_jobs(arch, &[job], features.and(arch.cpu_all_features())).unwrap();
                let got = common::native::decode_outputs(&raw[0], &wants).unwrap();
                common::compare(&got[0], &wants[0], 1e-5, 1e-5)
                    .unwrap_or_else(|e| panic!("{scheme} on {} {features:?}: {e}", arch.name()));
            }
        }
    }
}

/// QDQ weights (`qdq-weights`, first in the default pipeline): `MatMul(x, DequantizeLinear(W))`
/// with 8-bit W per column, per tensor (u8 with a zero point) and in blocks along K (a partial
/// last block, zero points varying) becomes MatMulNBits; the interpreter's outputs are unchanged
/// and the native code matches them. A DequantizeLinear that also feeds something other than a
/// matmul's B is not rewritten.
#[test]
fn qdq_weights_become_matmul_nbits() {
    use edgec::ir::{DType, Dim, GraphOutput, Op, TensorType, Value, ValueRef};
    let (k, n, rows) = (40, 24, 3);
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state >> 40
    };
    let x: Vec<f32> = (0..rows * k).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect();
    let q_i8: Vec<i8> = (0..k * n).map(|_| (next() % 255) as i8).collect();
    let q_u8: Vec<u8> = (0..k * n).map(|_| (next() % 256) as u8).collect();
    let scales = |len: usize, next: &mut dyn FnMut() -> u64| -> Vec<f32> {
        (0..len).map(|_| 0.001 + (next() % 100) as f32 / 10000.0).collect()
    };
    let per_col = scales(n, &mut next);
    let per_block = scales(3 * n, &mut next);
    let zp_block: Vec<i8> = (0..3 * n).map(|_| (next() % 21) as i8 - 10).collect();
    // (case, weight, scale, zero point, axis, block_size, also read by an Add)
    let cases: Vec<(&str, Tensor, Tensor, Tensor, i64, i64, bool)> = vec![
        (
            "per column",
            Tensor::from_vec(vec![k, n], q_i8.clone()),
            Tensor::from_vec(vec![n], per_col.clone()),
            Tensor::from_vec(vec![n], vec![0i8; n]),
            1,
            0,
            false,
        ),
        (
            "per tensor u8",
            Tensor::from_vec(vec![k, n], q_u8),
            Tensor::from_vec(vec![1], vec![0.004f32]),
            Tensor::from_vec(vec![1], vec![117u8]),
            1,
            0,
            false,
        ),
        (
            "blocks of 16",
            Tensor::from_vec(vec![k, n], q_i8.clone()),
            Tensor::from_vec(vec![3, n], per_block),
            Tensor::from_vec(vec![3, n], zp_block),
            0,
            16,
            false,
        ),
        (
            "shared with an Add",
            Tensor::from_vec(vec![k, n], q_i8),
            Tensor::from_vec(vec![n], per_col),
            Tensor::from_vec(vec![n], vec![0i8; n]),
            1,
            0,
            true,
        ),
    ];
    for (case, w, s, z, axis, block_size, shared) in cases {
        let mut g = Graph::new("t", 21);
        let ty = TensorType::new(DType::F32, vec![Dim::sym("rows"), Dim::fixed(k as i64)]);
        let xin = g.add_node(Op::Input { index: 0 }, "x".into(), &[], vec![Value { name: "x".into(), ty }]);
        g.inputs.push(xin);
        let (wc, sc, zc) = (g.add_const("w".into(), &w), g.add_const("s".into(), &s), g.add_const("z".into(), &z));
        let wty = TensorType::new(DType::F32, vec![Dim::fixed(k as i64), Dim::fixed(n as i64)]);
        let dq = g.add_node(
            Op::DequantizeLinear { axis, block_size },
            "dq".into(),
            &[Some(wc), Some(sc), Some(zc)],
            vec![Value { name: "wf".into(), ty: wty.clone() }],
        );
        let dqv = ValueRef { node: dq, slot: 0 };
        let out_ty = TensorType::new(DType::F32, vec![Dim::sym("rows"), Dim::fixed(n as i64)]);
        let y = Value { name: "y".into(), ty: out_ty };
        let mm = g.add_node(Op::MatMul, "mm".into(), &[Some(ValueRef { node: xin, slot: 0 }), Some(dqv)], vec![y]);
        g.outputs.push(GraphOutput { name: "y".into(), value: ValueRef { node: mm, slot: 0 } });
        if shared {
            let b = g.add_node(
                Op::Binary(edgec::ir::BinaryOp::Add),
                "plus".into(),
                &[Some(dqv), Some(dqv)],
                vec![Value { name: "w2".into(), ty: wty }],
            );
            g.outputs.push(GraphOutput { name: "w2".into(), value: ValueRef { node: b, slot: 0 } });
        }
        edgec::ir::verify::verify(&g).unwrap();
        let feeds = vec![("x".to_string(), Tensor::from_vec(vec![rows, k], x.clone()))];
        let want = Interpreter::new(&g).unwrap().run(&feeds).unwrap();
        let mut q = g.clone();
        PassManager::default_pipeline().run(&mut q, &mut |_, _, _| {}).unwrap();
        let nbits = q.g.node_weights().filter(|nd| matches!(nd.op, Op::MatMulNBits { bits: 8, .. })).count();
        let dqs = q.g.node_weights().filter(|nd| matches!(nd.op, Op::DequantizeLinear { .. })).count();
        // (Shared, the small weight is folded to f32 by const-fold instead.)
        assert_eq!(nbits, if shared { 0 } else { 1 }, "{case}");
        assert_eq!(dqs, 0, "{case}");
        let got = Interpreter::new(&q).unwrap().run(&feeds).unwrap();
        common::compare(&got[0].1, &want[0].1, 1e-6, 1e-6).unwrap_or_else(|e| panic!("{case}: interpreter {e}"));
        let c = edgec::codegen::compile(&q, &common::native::test_options("host")).unwrap();
        let model = edgec_runtime::Model::from_bytes(&c.artifact().unwrap()).unwrap();
        let native = edgec::codegen::run_model(&model, &feeds).unwrap();
        common::compare(&native[0].1, &want[0].1, 1e-5, 1e-5).unwrap_or_else(|e| panic!("{case}: native {e}"));
    }
}

//! Weight quantization (`--quantize`): the IR it writes (insta snapshot), its error against the
//! f32 model on the reference interpreter. (MatMulNBits as onnxruntime runs it: the nbits_mlp
//! fixture in tiny_models.rs; native code for quantized models: codegen.rs.)

mod common;

use edgec::interp::Interpreter;
use edgec::ir::{text::render, Graph, Op, Tensor};
use edgec::passes::quantize::{Quantize, Rule, Scheme};
use edgec::passes::{pass_by_name, Pass, PassManager};

fn tiny_llama() -> (Graph, Vec<(String, Tensor)>) {
    let dir = common::repo_root().join("models/tiny/llama");
    let mut g = edgec::onnx::load_model(&dir.join("model.onnx")).unwrap();
    // Quantization runs before the matmul fusions (as in `edgec compile`).
    PassManager::default_around_quantize().0.run(&mut g, &mut |_, _, _| {}).unwrap();
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

/// Deterministic 24-bit numbers (xorshift64, the top bits).
fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state >> 40
    }
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
/// bit-identical inputs): the integer-dot kernels (host with pmaddubsw, for 8-bit weights too,
/// x86_64 baseline, aarch64
/// under qemu with and without SDOT, riscv64 with RVV) and the float fallback (riscv64 scalar)
/// against the interpreter, tight. Dynamic rounding per row and block, and static activation
/// scales (`--act-static`, QDQ pairs): int8 symmetric, int8 and uint8 with zero points (the
/// activations, in -3..3, saturate at both ends with the uint8 one).
#[test]
fn int8_activation_kernels_match_the_interpreter() {
    use common::qemu::{run_jobs, CrossArch};
    use edgec::ir::nbits::ActQuant;
    use edgec::ir::{DType, Dim, GraphOutput, Op, TensorType, Value, ValueRef};
    let (k, n, rows) = (80, 40, 5);
    let mut bits = xorshift(0x2545_F491_4F6C_DD1D);
    let mut next = || bits() as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
    let w: Vec<f32> = (0..k * n).map(|_| next()).collect();
    let x: Vec<f32> = (0..rows * k).map(|_| next() * 3.0).collect();
    let statics = [
        None,
        Some(ActQuant::new(3.0 / 127.0, 0, DType::I8).unwrap()),
        Some(ActQuant::new(0.03, -7, DType::I8).unwrap()),
        Some(ActQuant::new(0.02, 131, DType::U8).unwrap()),
    ];
    let schemes = ["w8a8", "w4a8", "w4a8:g16:asym", "int8:g32:asym:a8", "w4a8:g48", "w4a8:g64", "w4a8:g128:asym"];
    let cases = schemes.iter().flat_map(|s| statics.iter().map(move |a| (*s, *a)));
    for (scheme, act) in cases {
        // Every static variant on two schemes (symmetric and asymmetric weights) keeps qemu's time down.
        if act.is_some() && !matches!(scheme, "w8a8" | "w4a8:g16:asym" | "int8:g32:asym:a8") {
            continue;
        }
        let label = format!("{scheme} {act:?}");
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
        let mut q = g.clone();
        let mut pass = Quantize::new(scheme.parse().unwrap(), vec![]);
        if let Some(a) = act {
            pass.act_static.insert("mm".into(), a);
        }
        pass.run(&mut q).unwrap();
        pass_by_name("dce").unwrap().run(&mut q).unwrap();
        assert_eq!(
            q.g.node_weights().filter(|nd| matches!(nd.op, Op::MatMulNBits { act: a, .. } if a == act)).count(),
            1
        );
        let feeds = vec![("x".to_string(), Tensor::from_vec(vec![rows, k], x.clone()))];
        let want = Interpreter::new(&q).unwrap().run(&feeds).unwrap();
        for target in ["host", "x86_64"] {
            let c = edgec::codegen::compile(&q, &common::native::test_options(target)).unwrap();
            let model = edgec_runtime::Model::from_bytes(&c.artifact().unwrap()).unwrap();
            let got = edgec::codegen::run_model(&model, &feeds).unwrap();
            common::compare(&got[0].1, &want[0].1, 1e-5, 1e-5).unwrap_or_else(|e| panic!("{label} {target}: {e}"));
        }
        // x86 with SSSE3 multiplies with pmaddubsw: 4-bit nibbles, and 8-bit weights unless one is
        // -128 (the block minimum of asymmetric int8 is q = 0, stored -128).
        let mut o = common::native::test_options("x86_64");
        (o.features, o.listing) = (Some("+ssse3".into()), true);
        let listing = edgec::codegen::compile(&q, &o).unwrap().listing.unwrap();
        let sign_moved = !scheme.contains("asym") || scheme.starts_with("w4a8");
        assert_eq!(listing.contains("pmaddubsw"), sign_moved, "{label}");
        // Baseline and with every feature (aarch64: SDOT with dotprod; riscv64: RVV).
        for arch in CrossArch::CROSS {
            for features in [None, Some(arch.kernel_feature())] {
                let inputs = vec![feeds[0].1.clone()];
                let wants = vec![want[0].1.clone()];
                let mut o = common::native::test_options(arch.name());
                o.features = features.map(str::to_string);
                let job = common::native::cross_job_with(&label, &q, &inputs, &wants, &o).unwrap();
                let raw = run_jobs(arch, &[job], features.and(arch.cpu_all_features())).unwrap();
                let got = common::native::decode_outputs(&raw[0], &wants).unwrap();
                common::compare(&got[0], &wants[0], 1e-5, 1e-5)
                    .unwrap_or_else(|e| panic!("{label} on {} {features:?}: {e}", arch.name()));
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
    let mut next = xorshift(0x9E37_79B9_7F4A_7C15);
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

fn with_rules(g: &Graph, scheme: &str, rules: &[&str]) -> Graph {
    let mut q = g.clone();
    let mut pass = Quantize::new(scheme.parse().unwrap(), vec![]);
    pass.rules = rules.iter().map(|r| r.parse().unwrap()).collect();
    pass.run(&mut q).unwrap();
    pass_by_name("dce").unwrap().run(&mut q).unwrap();
    edgec::ir::verify::verify(&q).unwrap();
    q
}

/// (node name, bits) of every MatMulNBits, and the names of the MatMuls left in f32.
fn precisions(g: &Graph) -> (Vec<(String, usize)>, Vec<String>) {
    let (mut q, mut f) = (Vec::new(), Vec::new());
    for n in g.g.node_indices() {
        match g.node(n).op {
            Op::MatMulNBits { bits, .. } => q.push((g.node(n).name.clone(), bits)),
            Op::MatMul => f.push(g.node(n).name.clone()),
            _ => {}
        }
    }
    (q, f)
}

/// Deterministic token sequences over the tiny Llama's vocabulary (128).
fn token_seqs(n: usize, len: usize, seed: u64) -> Vec<Vec<u32>> {
    common::token_seqs(n, len, 128, seed)
}

/// `--keep PATTERN=PRECISION`: the first matching rule sets a layer's precision, `*=int8` is the
/// int8 scheme, `=fp32` is `--keep-fp32`, and bad rules are errors.
#[test]
fn keep_rules_set_each_layers_precision() {
    let (g, feeds) = tiny_llama();
    let reference = Interpreter::new(&g).unwrap().run(&feeds).unwrap();
    let err = |q: &Graph| relative_error(q, &reference, &feeds);

    let lm8 = with_rules(&g, "int4", &["lm_head=int8"]);
    let (q, f) = precisions(&lm8);
    assert!(f.iter().all(|n| !n.contains("lm_head")), "{f:?}");
    assert_eq!(q.iter().filter(|(n, b)| n.contains("lm_head") && *b == 8).count(), 1, "{q:?}");
    assert!(q.iter().filter(|(n, _)| !n.contains("lm_head")).all(|(_, b)| *b == 4), "{q:?}");
    let (e4, e_lm8) = (err(&quantized(&g, "int4", &[])), err(&lm8));
    let e_lm32 = err(&with_rules(&g, "int4", &["lm_head=fp32"]));
    println!("int4 {e4:.3e}, lm_head int8 {e_lm8:.3e}, lm_head fp32 {e_lm32:.3e}");
    assert!(e_lm32 < e_lm8 && e_lm8 < e4, "{e_lm32} {e_lm8} {e4}");

    // `=fp32` is --keep-fp32; `*=int8` under int4 is the int8 scheme, bit for bit.
    assert_eq!(render(&with_rules(&g, "int4", &["lm_head=fp32"])), render(&quantized(&g, "int4", &["lm_head"])));
    assert_eq!(render(&with_rules(&g, "int4", &["*=int8"])), render(&quantized(&g, "int8", &[])));
    // The first matching rule wins.
    let (q, f) = precisions(&with_rules(&g, "int4", &["lm_head=fp32", "*=int8", "layers.0=int4"]));
    assert!(f.len() == 1 && f[0].contains("lm_head"), "{f:?}");
    assert!(q.iter().all(|(_, b)| *b == 8), "{q:?}");

    for bad in ["lm_head", "=int8", "lm_head=int3", "lm_head=int4:g7"] {
        assert!(bad.parse::<Rule>().is_err(), "{bad}");
    }
}

/// The sensitivity scan ranks every quantized linear layer by its relative output error on the
/// calibration activations and skips layers a rule already places. The tiny model's random layers
/// are all about equally sensitive, so one gets outlier weights (one per column, 8x the column's
/// largest, as real LLM weights have): the scan must rank it first, and keeping the top layers at
/// int8 must beat keeping the same number of bottom ones.
#[test]
fn sensitivity_scan_ranks_layers_by_output_error() {
    use edgec::calib::{linear_layers, Calibration, Options};
    use edgec::passes::prune::{replace_weight, weight_kn, weight_tensor};
    use edgec::passes::sensitivity::{choose, keep_rules, scan, to_json, Budget};
    let (mut g, feeds) = tiny_llama();
    let outlier = "/model/layers.1/mlp/up_proj/MatMul";
    let l = linear_layers(&g).into_iter().find(|l| g.node(l.node).name == outlier).unwrap();
    let mut w = weight_kn(&g, &l);
    for c in 0..l.n {
        let peak = (0..l.k).map(|k| w[k * l.n + c].abs()).fold(0.0, f64::max);
        w[(c * 7 % l.k) * l.n + c] = 8.0 * peak;
    }
    replace_weight(&mut g, &l, &weight_tensor(&l, &w));
    pass_by_name("dce").unwrap().run(&mut g).unwrap();
    let reference = Interpreter::new(&g).unwrap().run(&feeds).unwrap();
    let cal = Calibration::collect(&g, &token_seqs(4, 16, 3), &Options::default()).unwrap();
    let scheme: Scheme = "int4:channel".parse().unwrap();
    let pass = Quantize::new(scheme, vec![]);
    let ranking = scan(&g, &cal, &pass).unwrap();
    let (q, _) = precisions(&quantized(&g, "int4:channel", &[]));
    assert_eq!(ranking.len(), q.len(), "every quantized MatMul is ranked");
    assert!(ranking.windows(2).all(|w| w[0].rel_error >= w[1].rel_error));
    assert!(ranking.iter().all(|s| s.rel_error > 0.0 && s.rel_error < 1.0 && s.bytes > 0));
    assert_eq!(ranking[0].name, outlier);
    assert!(ranking[0].rel_error > 3.0 * ranking[1].rel_error, "{:?}", &ranking[..2]);
    for s in &ranking {
        println!("{:.4e} {} {}x{}", s.rel_error, s.name, s.k, s.n);
    }
    // A layer a rule places is not ranked.
    let mut ruled = Quantize::new(scheme, vec![]);
    ruled.rules.push("lm_head=int8".parse().unwrap());
    let r2 = scan(&g, &cal, &ruled).unwrap();
    assert_eq!(r2.len(), ranking.len() - 1);
    assert!(r2.iter().all(|s| !s.name.contains("lm_head")));

    // The scan ranks round-to-nearest errors even when the pass has another rounder (GPTQ in
    // `edgec compile`; its calibration-row errors are in-sample): a rounder that zeroes a layer
    // changes nothing.
    let mut zeroing = Quantize::new(scheme, vec![]);
    zeroing.rounder = Some(Box::new(move |_, _, k, n, scheme| {
        Ok(Some(edgec::passes::quantize::Quantized::new(k, n, scheme).unwrap()))
    }));
    assert_eq!(scan(&g, &cal, &zeroing).unwrap(), ranking);

    let n = 3;
    let keep_at = |layers: &[edgec::passes::sensitivity::Sensitivity]| {
        let mut p = Quantize::new(scheme, vec![]);
        let int8 = Some("int8".parse().unwrap());
        p.rules = keep_rules(layers, &choose(layers, Budget::Layers(n), int8).unwrap(), int8);
        let mut q = g.clone();
        p.run(&mut q).unwrap();
        pass_by_name("dce").unwrap().run(&mut q).unwrap();
        let bits = precisions(&q).0;
        assert_eq!(bits.iter().filter(|(_, b)| *b == 8).count(), n);
        relative_error(&q, &reference, &feeds)
    };
    let bottom: Vec<_> = ranking.iter().rev().cloned().collect();
    let (top_err, bottom_err) = (keep_at(&ranking), keep_at(&bottom));
    println!("keep top {n}: {top_err:.4e}, keep bottom {n}: {bottom_err:.4e}");
    assert!(top_err < bottom_err, "top {top_err} vs bottom {bottom_err}");

    // A byte budget keeps, in rank order, the layers whose extra bytes fit: here the top layer
    // (64x128 int4 per channel 4 KiB + scales, int8 8 KiB + scales) and then only smaller ones.
    let int8_scheme: Scheme = "int8".parse().unwrap();
    let int8 = Some(int8_scheme);
    let extra = |s: &edgec::passes::sensitivity::Sensitivity| int8_scheme.weight_bytes(s.k, s.n).unwrap() - s.bytes;
    let budget = extra(&ranking[0]) + extra(&ranking[0]) / 2;
    let chosen = choose(&ranking, Budget::Bytes(budget), int8).unwrap();
    assert!(chosen[0]);
    let spent: usize = ranking.iter().zip(&chosen).filter(|(_, &c)| c).map(|(s, _)| extra(s)).sum();
    assert!(spent <= budget && chosen.iter().filter(|&&c| c).count() > 1, "{chosen:?}");
    for (s, c) in ranking.iter().zip(&chosen) {
        // Every layer left out would not have fit.
        assert!(*c || extra(s) > budget - spent, "{}", s.name);
    }
    assert_eq!("2MB".parse::<Budget>().unwrap(), Budget::Bytes(2_000_000));
    assert_eq!("0.5KB".parse::<Budget>().unwrap(), Budget::Bytes(500));
    assert_eq!("7".parse::<Budget>().unwrap(), Budget::Layers(7));
    assert!("7 layers".parse::<Budget>().is_err() && "-1MB".parse::<Budget>().is_err());

    let json = to_json(&ranking, &choose(&ranking, Budget::Layers(n), int8).unwrap(), scheme, int8, 1.0);
    assert!(
        json.starts_with(r#"{"pass":"sensitivity","scheme":"int4:channel","keep":"int8:channel","kept":3"#),
        "{json}"
    );
    assert_eq!(json.matches(r#""kept":true"#).count(), n);
}

#[test]
fn quantized_llama_with_rules_snapshot() {
    let (g, _) = tiny_llama();
    let q = with_rules(&g, "int4", &["lm_head=int8", "layers.1/mlp=int4:g16:asym", "layers.1=fp32"]);
    insta::assert_snapshot!("llama@quantize-int4-rules", render(&q));
}

/// `--act-static`: static activation scales from a calibration run, for every linear layer of the
/// tiny Llama under w8a8 (the pass writes them into each MatMulNBits). The logits stay close to
/// f32 with each method (one scale per tensor is coarser than dynamic per-row scales, so the bound
/// is looser than dynamic's), and native code matches the interpreter's reading of the static
/// graph: the first layer's input is bit-identical, later ones can round one step apart near a
/// rounding boundary (as with dynamic int8 activations in codegen.rs: |diff| <= 0.05).
#[test]
fn static_activation_scales_from_calibration() {
    use edgec::calib::{linear_layers, Calibration, Options};
    use edgec::passes::quantize::{static_scales, ActStatic};
    let (g, feeds) = tiny_llama();
    let reference = Interpreter::new(&g).unwrap().run(&feeds).unwrap();
    let cal =
        Calibration::collect(&g, &token_seqs(8, 16, 5), &Options { percentile: 99.9, channel_stats: true }).unwrap();
    let dynamic = relative_error(&quantized(&g, "w8a8", &[]), &reference, &feeds);
    println!("w8a8 dynamic: relative logit error {dynamic:.3e}");
    for method in ["minmax", "minmax:asym", "percentile:99.9"] {
        let m: ActStatic = method.parse().unwrap();
        let mut pass = Quantize::new("w8a8".parse().unwrap(), vec![]);
        pass.act_static = static_scales(&g, &cal, m);
        assert_eq!(pass.act_static.len(), linear_layers(&g).len(), "{method}");
        let mut q = g.clone();
        pass.run(&mut q).unwrap();
        pass_by_name("dce").unwrap().run(&mut q).unwrap();
        let statics = q.g.node_weights().filter(|nd| matches!(nd.op, Op::MatMulNBits { act: Some(_), .. })).count();
        assert_eq!(statics, linear_layers(&g).len(), "{method}");
        let err = relative_error(&q, &reference, &feeds);
        println!("w8a8 --act-static {method}: relative logit error {err:.3e}");
        assert!(err < 0.1, "{method}: {err}");
        let want = Interpreter::new(&q).unwrap().run(&feeds).unwrap();
        let c = edgec::codegen::compile(&q, &common::native::test_options("host")).unwrap();
        let model = edgec_runtime::Model::from_bytes(&c.artifact().unwrap()).unwrap();
        let got = edgec::codegen::run_model(&model, &feeds).unwrap();
        common::compare(&got[0].1, &want[0].1, 0.0, 0.05).unwrap_or_else(|e| panic!("{method} native: {e}"));
    }
    // Another layer's scale does not apply: a name with no statistics keeps dynamic rounding.
    let mut pass = Quantize::new("w8a8".parse().unwrap(), vec![]);
    pass.act_static = static_scales(&g, &cal, ActStatic::MinMax { asym: false });
    pass.act_static.retain(|name, _| name.contains("lm_head"));
    let mut q = g.clone();
    pass.run(&mut q).unwrap();
    let statics: Vec<_> =
        q.g.node_weights()
            .filter(|nd| matches!(nd.op, Op::MatMulNBits { act: Some(_), .. }))
            .map(|nd| nd.name.clone())
            .collect();
    assert!(statics.len() == 1 && statics[0].contains("lm_head"), "{statics:?}");
}

/// QDQ activations (`qdq-activations`, after `qdq-weights` in the default pipeline) on the two QDQ
/// fixtures, qdq_mlp (written by hand like a QAT export) and qdq_static_mlp (onnxruntime's own
/// quantize_static): every pair feeding a matmul folds into the MatMulNBits' static activation
/// scale, the interpreter's outputs stay bit-identical to the graph as written (tiny_models.rs
/// checks both against onnxruntime), and native code (host, x86_64 baseline, aarch64 with and
/// without SDOT and riscv64 under qemu) matches them. qdq_static_mlp's output is itself
/// quantized (steps of 0.019): a matmul result within float rounding of a step boundary may land
/// on the neighbouring step, so native code is held to one step there, 1e-5 elsewhere.
#[test]
fn qdq_activations_run_on_the_integer_kernels() {
    use common::qemu::{run_jobs, CrossArch};
    for (name, folded, tol) in [("qdq_mlp", 2, 1e-5), ("qdq_static_mlp", 2, 0.02)] {
        let dir = common::repo_root().join("models/tiny").join(name);
        let g = edgec::onnx::load_model(&dir.join("model.onnx")).unwrap();
        let feeds = common::read_npy_dir(&dir.join("inputs"));
        let as_written = Interpreter::new(&g).unwrap().run(&feeds).unwrap();
        let mut q = g.clone();
        PassManager::default_pipeline().run(&mut q, &mut |_, _, _| {}).unwrap();
        // MatMulNBits, or MatMulAct after fusing a bias / activation: with a static scale.
        let act = |op: &Op| op.nbits().map(|(q, _)| q.act.is_some());
        let statics = q.g.node_weights().filter(|nd| act(&nd.op) == Some(true)).count();
        assert_eq!(statics, folded, "{name}");
        assert!(!q.g.node_weights().any(|nd| matches!(nd.op, Op::MatMul) || act(&nd.op) == Some(false)));
        let got = Interpreter::new(&q).unwrap().run(&feeds).unwrap();
        assert!(got == as_written, "{name}: the fold changed the interpreter's outputs");
        for target in ["host", "x86_64"] {
            let c = edgec::codegen::compile(&q, &common::native::test_options(target)).unwrap();
            let model = edgec_runtime::Model::from_bytes(&c.artifact().unwrap()).unwrap();
            let native = edgec::codegen::run_model(&model, &feeds).unwrap();
            common::compare(&native[0].1, &got[0].1, 0.0, tol).unwrap_or_else(|e| panic!("{name} {target}: {e}"));
        }
        for arch in CrossArch::CROSS {
            for features in [None, Some(arch.kernel_feature())] {
                let inputs = vec![feeds[0].1.clone()];
                let wants = vec![got[0].1.clone()];
                let mut o = common::native::test_options(arch.name());
                o.features = features.map(str::to_string);
                let job = common::native::cross_job_with(name, &q, &inputs, &wants, &o).unwrap();
                let raw = run_jobs(arch, &[job], features.and(arch.cpu_all_features())).unwrap();
                let native = common::native::decode_outputs(&raw[0], &wants).unwrap();
                common::compare(&native[0], &wants[0], 0.0, tol)
                    .unwrap_or_else(|e| panic!("{name} on {} {features:?}: {e}", arch.name()));
            }
        }
    }
}

/// What `qdq-activations` leaves as written: a per-axis activation scale, and a pair whose
/// QuantizeLinear and DequantizeLinear disagree on the scale.
#[test]
fn qdq_activations_leave_other_pairs_alone() {
    use edgec::ir::{DType, Dim, GraphOutput, TensorType, Value, ValueRef};
    let (k, n) = (8, 4);
    let cases: [(&str, Tensor, Tensor); 2] = [
        ("per axis", Tensor::from_vec(vec![k], vec![0.02f32; k]), Tensor::from_vec(vec![k], vec![0.02f32; k])),
        ("scales differ", Tensor::from_vec(vec![1], vec![0.02f32]), Tensor::from_vec(vec![1], vec![0.03f32])),
    ];
    for (case, qs, ds) in cases {
        let mut g = Graph::new("t", 21);
        let ty = TensorType::new(DType::F32, vec![Dim::sym("rows"), Dim::fixed(k as i64)]);
        let xin = g.add_node(Op::Input { index: 0 }, "x".into(), &[], vec![Value { name: "x".into(), ty: ty.clone() }]);
        g.inputs.push(xin);
        let zl = if qs.len() == 1 { 1 } else { k };
        let (qsc, dsc) = (g.add_const("qs".into(), &qs), g.add_const("ds".into(), &ds));
        let zc = g.add_const("z".into(), &Tensor::from_vec(vec![zl], vec![0i8; zl]));
        let q_ty = TensorType::new(DType::I8, ty.shape.clone().unwrap());
        let quant = Op::QuantizeLinear { axis: 1, saturate: true, block_size: 0, output_dtype: None };
        let qn = g.add_node(
            quant,
            "q".into(),
            &[Some(ValueRef { node: xin, slot: 0 }), Some(qsc), Some(zc)],
            vec![Value { name: "xq".into(), ty: q_ty }],
        );
        let dq = Op::DequantizeLinear { axis: 1, block_size: 0 };
        let dn = g.add_node(
            dq,
            "dq".into(),
            &[Some(ValueRef { node: qn, slot: 0 }), Some(dsc), Some(zc)],
            vec![Value { name: "xd".into(), ty: ty.clone() }],
        );
        let w: Vec<i8> = (0..k * n).map(|i| (i as i8 % 7) - 3).collect();
        let (wc, ws) = (
            g.add_const("w".into(), &Tensor::from_vec(vec![k, n], w)),
            g.add_const("ws".into(), &Tensor::scalar(0.1f32)),
        );
        let wty = TensorType::new(DType::F32, vec![Dim::fixed(k as i64), Dim::fixed(n as i64)]);
        let wd = g.add_node(
            Op::DequantizeLinear { axis: 1, block_size: 0 },
            "wdq".into(),
            &[Some(wc), Some(ws), None],
            vec![Value { name: "wf".into(), ty: wty }],
        );
        let out_ty = TensorType::new(DType::F32, vec![Dim::sym("rows"), Dim::fixed(n as i64)]);
        let mm = g.add_node(
            Op::MatMul,
            "mm".into(),
            &[Some(ValueRef { node: dn, slot: 0 }), Some(ValueRef { node: wd, slot: 0 })],
            vec![Value { name: "y".into(), ty: out_ty }],
        );
        g.outputs.push(GraphOutput { name: "y".into(), value: ValueRef { node: mm, slot: 0 } });
        edgec::ir::verify::verify(&g).unwrap();
        let x: Vec<f32> = (0..3 * k).map(|i| i as f32 * 0.37 - 4.0).collect();
        let feeds = vec![("x".to_string(), Tensor::from_vec(vec![3, k], x))];
        let want = Interpreter::new(&g).unwrap().run(&feeds).unwrap();
        let mut q = g.clone();
        PassManager::default_pipeline().run(&mut q, &mut |_, _, _| {}).unwrap();
        let ops: Vec<&Op> = q.g.node_weights().map(|nd| &nd.op).collect();
        assert!(ops.iter().any(|op| matches!(op, Op::MatMulNBits { act: None, .. })), "{case}: {ops:?}");
        assert!(ops.iter().any(|op| matches!(op, Op::QuantizeLinear { .. })), "{case}: {ops:?}");
        assert!(Interpreter::new(&q).unwrap().run(&feeds).unwrap() == want, "{case}");
    }
}

/// `--smooth` (SmoothQuant) on the tiny Llama: an exact rewrite in f32 (logits within 1e-5 of the
/// unsmoothed graph on the interpreter) that reaches the q/k/v, gate/up, down and lm_head inputs
/// (the norms' scales and the up projections take the division), and that shrinks the range
/// static activation scales must cover: the largest per-tensor minmax scale drops.
#[test]
fn smoothing_is_exact_and_narrows_activation_ranges() {
    use edgec::calib::{linear_layers, Calibration, Options};
    use edgec::passes::quantize::{static_scales, ActStatic};
    use edgec::passes::smooth::{smooth, Strength};
    let (g, feeds) = tiny_llama();
    let reference = Interpreter::new(&g).unwrap().run(&feeds).unwrap();
    let opts = Options { channel_stats: true, ..Default::default() };
    let seqs = token_seqs(8, 16, 5);
    let cal = Calibration::collect(&g, &seqs, &opts).unwrap();
    let mut s = g.clone();
    let r = smooth(&mut s, &cal, &Strength::Alpha(0.5)).unwrap();
    pass_by_name("dce").unwrap().run(&mut s).unwrap();
    edgec::ir::verify::verify(&s).unwrap();
    let layers = linear_layers(&g).len();
    // All but the two o_proj, whose input (the attention output) has nothing to fold into.
    assert_eq!((r.inputs, r.layers), (7, layers - 2), "{r:?}");
    assert!(r.max_factor > 1.0 && r.min_factor < r.max_factor, "{r:?}");
    let err = relative_error(&s, &reference, &feeds);
    assert!(err < 1e-5, "smoothing changed the logits: relative error {err:.3e}");
    insta::assert_snapshot!("llama@smooth", render(&s));
    let widest = |g: &Graph| {
        let cal = Calibration::collect(g, &seqs, &opts).unwrap();
        static_scales(g, &cal, ActStatic::MinMax { asym: false }).values().map(|q| q.scale).fold(0f32, f32::max)
    };
    let (before, after) = (widest(&g), widest(&s));
    assert!(after < before, "widest static scale {before} -> {after}");
}

/// `--smooth awq` where it matters: an embedding, a LayerNorm whose scale makes four of 64
/// channels 25x larger (the salient channels of real LLM activations) and a 64x96 linear layer.
/// The scaling is an exact rewrite in f32, it is folded into the LayerNorm's scale and bias, and
/// int4 (g32) rounding of the scaled weight lands much closer to the f32 output than plain
/// round-to-nearest: the salient rows get finer steps.
#[test]
fn awq_scaling_lowers_int4_error() {
    use common::{f32_initializer, model, node, value_info};
    use edgec::calib::Calibration;
    use edgec::passes::smooth::{smooth, Strength};
    let mut next = xorshift(0x5eed);
    let mut uniform = |scale: f32| (next() as f32 / (1u64 << 24) as f32 - 0.5) * scale;
    let table: Vec<f32> = (0..128 * 64).map(|_| uniform(2.0)).collect();
    let gamma: Vec<f32> = (0..64).map(|j| if j % 16 == 3 { 25.0 } else { 1.0 }).collect();
    let beta: Vec<f32> = (0..64).map(|_| uniform(0.2)).collect();
    let w: Vec<f32> = (0..64 * 96).map(|_| uniform(0.5)).collect();
    let m = model(
        17,
        vec![
            node("Gather", &["table", "input_ids"], &["e"]),
            node("LayerNormalization", &["e", "gamma", "beta"], &["x"]),
            node("MatMul", &["x", "w"], &["y"]),
        ],
        vec![value_info("input_ids", 7, &["batch", "seq"])],
        vec![value_info("y", 1, &[])],
        vec![
            f32_initializer("table", &[128, 64], &table),
            f32_initializer("gamma", &[64], &gamma),
            f32_initializer("beta", &[64], &beta),
            f32_initializer("w", &[64, 96], &w),
        ],
    );
    let bytes = prost::Message::encode_to_vec(&m);
    let mut g = edgec::onnx::load_model_bytes(bytes.into(), None, "salient").unwrap();
    PassManager::default_around_quantize().0.run(&mut g, &mut |_, _, _| {}).unwrap();
    let ids: Vec<i64> = token_seqs(4, 16, 9).into_iter().flatten().map(i64::from).collect();
    let feeds = vec![("input_ids".to_string(), Tensor::from_vec(vec![4, 16], ids))];
    let reference = Interpreter::new(&g).unwrap().run(&feeds).unwrap();
    let cal = Calibration::collect(&g, &token_seqs(8, 16, 5), &Default::default()).unwrap();
    let pass = Quantize::new("int4".parse().unwrap(), vec![]);
    let mut s = g.clone();
    let r = smooth(&mut s, &cal, &Strength::Awq(&pass)).unwrap();
    assert_eq!((r.inputs, r.layers), (1, 1), "{r:?}");
    let exact = relative_error(&s, &reference, &feeds);
    assert!(exact < 1e-5, "AWQ scaling changed the f32 output: {exact:.3e}");
    let plain = relative_error(&quantized(&g, "int4", &[]), &reference, &feeds);
    let awq = relative_error(&quantized(&s, "int4", &[]), &reference, &feeds);
    // AWQ's second half: block ranges searched by activation energy (as `--smooth awq` does).
    let mut clip = Quantize::new("int4".parse().unwrap(), vec![]);
    clip.weigh_ranges_by(&s, &Calibration::collect(&s, &token_seqs(8, 16, 5), &Default::default()).unwrap());
    assert_eq!(clip.importance.len(), 1);
    let mut q = s.clone();
    clip.run(&mut q).unwrap();
    let clipped = relative_error(&q, &reference, &feeds);
    println!("int4 relative output error: round-to-nearest {plain:.4e}, AWQ-scaled {awq:.4e}, + weighted ranges {clipped:.4e}; {r:?}");
    assert!(awq < 0.8 * plain, "AWQ {awq:.4e} vs plain {plain:.4e}");
    assert!(clipped <= awq, "weighted ranges {clipped:.4e} vs AWQ scaling alone {awq:.4e}");
}

/// `--keep-sensitive` finds its layers from the graph: the value projections by structure (the
/// same layers with attention fused or not; GPT-2's merged q/k/v projection whole), blocks by their
/// names, the lm_head as the one linear layer outside them.
#[test]
fn sensitive_layers_are_found_by_structure() {
    use edgec::passes::sensitive_layers::{find, Reason, SensitiveLayers};
    let values = SensitiveLayers { head: false, end_blocks: 0, values: true };
    for (model, value_name, blocks) in [("llama", "v_proj", 2), ("gpt2", "c_attn", 2), ("bert", "value", 2)] {
        let path = common::repo_root().join(format!("models/tiny/{model}/model.onnx"));
        let g = edgec::onnx::load_model(&path).unwrap();
        let mut fused = g.clone();
        PassManager::default_around_quantize().0.run(&mut fused, &mut |_, _, _| {}).unwrap();
        assert!(fused.g.node_weights().any(|n| matches!(n.op, Op::Attention { .. })), "{model}: attention fused");
        let mut unfused = g.clone();
        PassManager::parse("const-fold,cse,dce").unwrap().run(&mut unfused, &mut |_, _, _| {}).unwrap();
        let found = find(&fused, values);
        assert_eq!(found.len(), blocks, "{model}: {found:?}");
        assert!(found.iter().all(|(n, r)| n.contains(value_name) && *r == Reason::Value), "{model}: {found:?}");
        assert_eq!(find(&unfused, values), found, "{model}: unfused attention");

        // Everything in the first and last block (here: every block), and the head.
        let all = find(&fused, SensitiveLayers::default());
        let linear = edgec::calib::linear_layers(&fused);
        let heads: Vec<_> = all.iter().filter(|(_, r)| *r == Reason::Head).collect();
        assert_eq!(all.len(), linear.len(), "{model}: {all:?}");
        assert!(heads.len() <= 1, "{model}: {heads:?}");
    }
    // The Llama's head is its lm_head; with no end blocks and no values, only it is kept.
    let (g, _) = tiny_llama();
    let head = find(&g, SensitiveLayers { head: true, end_blocks: 0, values: false });
    assert!(head.len() == 1 && head[0].0.contains("lm_head") && head[0].1 == Reason::Head, "{head:?}");
}

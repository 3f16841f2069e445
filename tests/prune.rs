//! Pruning passes and calibration on the tiny random Llama (models/tiny-lm: 2 blocks, hidden 32,
//! 4 query / 2 KV heads of 8, FFN 48, vocab 96): sparsity patterns, structured shrinking (snapshot
//! and equality with the unshrunk model whose removed heads/channels are zeroed), and recovery.

mod common;

use edgec::calib::{self, Calibration};
use edgec::interp::Interpreter;
use edgec::ir::{text::render, Graph, Tensor};
use edgec::passes::prune::{self, PruneReport, PruneSpec, Recover};
use edgec::passes::PassManager;

fn tiny_lm(file: &str) -> Graph {
    let mut g = edgec::onnx::load_model(&common::repo_root().join("models/tiny-lm").join(file)).unwrap();
    // Pruning runs before fusion (`edgec compile --prune` orders it so).
    PassManager::parse("const-fold,cse,dce").unwrap().run(&mut g, &mut |_, _, _| {}).unwrap();
    g
}

/// Deterministic token sequences over the tiny vocabulary (96).
fn seqs(n: usize, len: usize, seed: u64) -> Vec<Vec<u32>> {
    common::token_seqs(n, len, 96, seed)
}

fn run(g: &Graph, feeds: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    Interpreter::new(g).unwrap().run(feeds).unwrap()
}

fn prune_with(g: &mut Graph, spec: &str, calib: Option<&[Vec<u32>]>) -> PruneReport {
    let s = PruneSpec::parse(spec).unwrap();
    prune::prune(g, &s, spec, calib).unwrap()
}

fn mean_sq_diff(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_f64_vec(), b.to_f64_vec());
    a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>() / a.len() as f64
}

#[test]
fn two_four_keeps_exactly_two_of_every_four_along_k() {
    let mut g = tiny_lm("model.onnx");
    let report = prune_with(&mut g, "2:4", None);
    assert_eq!(report.layers.len(), 14, "7 linear layers per block, lm_head excluded");
    let prunable: Vec<_> = prune::prunable_layers(&g).iter().map(|l| l.node).collect();
    for l in calib::linear_layers(&g) {
        let name = &g.const_of(l.weight).unwrap().name;
        let w = g.const_of(l.weight).unwrap().to_tensor().to_f64_vec();
        if !prunable.contains(&l.node) {
            assert!(name.contains("lm_head") && w.iter().all(|&x| x != 0.0), "the tied lm_head stays dense");
            continue;
        }
        for n in 0..l.n {
            for k0 in (0..l.k).step_by(4) {
                let nz = (k0..k0 + 4).filter(|&k| w[l.index(k, n)] != 0.0).count();
                assert_eq!(nz, 2, "{name}: column {n}, rows {k0}..{}", k0 + 4);
            }
        }
    }
    assert!(report.layers.iter().all(|l| (l.sparsity - 0.5).abs() < 1e-12));
}

#[test]
fn unstructured_reaches_the_target_sparsity() {
    for f in [0.3, 0.5, 0.7] {
        let mut g = tiny_lm("model.onnx");
        let report = prune_with(&mut g, &format!("unstructured:{f}"), None);
        for l in &report.layers {
            let numel: usize = l.shape_after.iter().product();
            let want = (f * numel as f64).round() / numel as f64;
            assert!((l.sparsity - want).abs() < 1e-12, "{}: {} vs {want}", l.name, l.sparsity);
        }
        // Dense storage is unchanged; the nonzero bytes drop by the pruned weights.
        assert_eq!(report.param_bytes_before, report.param_bytes_after);
        assert!(report.nonzero_bytes_after < report.param_bytes_after);
    }
}

#[test]
fn structured_pruning_shrinks_the_matrices_and_the_kv_repeat() {
    let mut g = tiny_lm("decoder_with_past.onnx");
    let report = prune_with(&mut g, "structured:0.3", Some(&seqs(2, 12, 1)));
    // GQA 4q/2kv: one query head per KV group goes, the KV cache keeps its 2 heads.
    assert_eq!(report.heads, vec![((4, 2), (2, 2)); 2]);
    assert!(report.mlp_channels.iter().all(|&(b, a)| b == 48 && a < 48 && a % 8 == 0), "{:?}", report.mlp_channels);
    assert!(report.param_bytes_after < report.param_bytes_before);
    insta::assert_snapshot!("tiny_lm_past_structured_0.3", render(&g));
}

/// The shrunk graph computes exactly what the original computes with the removed heads' o rows and
/// the removed channels' down rows zeroed.
#[test]
fn structured_pruning_equals_the_zeroed_original() {
    for file in ["model.onnx", "decoder_with_past.onnx"] {
        let original = tiny_lm(file);
        let mut g = original.clone();
        let report = prune_with(&mut g, "structured:0.3", Some(&seqs(2, 12, 1)));
        let mut zeroed = original.clone();
        let layers = calib::linear_layers(&original);
        let names: Vec<String> = layers.iter().map(|l| original.const_of(l.weight).unwrap().name.clone()).collect();
        let (mut ai, mut mi) = (0, 0);
        for (l, name) in layers.iter().zip(&names) {
            let keep: Vec<usize> = if name.contains("o_proj") {
                ai += 1;
                report.kept_heads[ai - 1].iter().flat_map(|&h| h * 8..h * 8 + 8).collect()
            } else if name.contains("down_proj") {
                mi += 1;
                report.kept_channels[mi - 1].clone()
            } else {
                continue;
            };
            let mut w = prune::weight_kn(&original, l);
            for k in (0..l.k).filter(|k| !keep.contains(k)) {
                w[k * l.n..(k + 1) * l.n].iter_mut().for_each(|x| *x = 0.0);
            }
            prune::replace_weight(&mut zeroed, l, &prune::weight_tensor(l, &w));
        }
        assert_eq!((ai, mi), (2, 2));
        let mut feeds = calib::lm_feeds(&g, &seqs(2, 9, 7)).unwrap();
        if file == "decoder_with_past.onnx" {
            // A non-empty cache: 3 past positions (mask and positions cover them).
            let past: Vec<f32> = (0..2 * 2 * 3 * 8).map(|i| ((i * 37 % 23) as f32 - 11.0) / 10.0).collect();
            for (name, t) in feeds.iter_mut() {
                if name.starts_with("past_key_values") {
                    *t = Tensor::from_vec(vec![2, 2, 3, 8], past.clone());
                } else if name == "attention_mask" {
                    *t = Tensor::from_vec(vec![2, 12], vec![1i64; 24]);
                } else if name == "position_ids" {
                    *t = Tensor::from_vec(vec![2, 9], (0..2).flat_map(|_| 3..12i64).collect::<Vec<_>>());
                }
            }
        }
        let (got, want) = (run(&g, &feeds), run(&zeroed, &feeds));
        assert_eq!(got.len(), want.len());
        for ((name, a), (_, b)) in got.iter().zip(&want) {
            common::compare(a, b, 0.0, 1e-5).unwrap_or_else(|e| panic!("{file} {name}: {e}"));
        }
        // And it really differs from the unpruned model.
        let base = run(&original, &feeds);
        assert!(mean_sq_diff(&got[0].1, &base[0].1) > 1e-6);
    }
}

#[test]
fn recovery_reduces_the_layer_output_error() {
    let original = tiny_lm("model.onnx");
    let cal_seqs = seqs(4, 16, 3);
    let cal = Calibration::collect(&original, &cal_seqs, &Default::default()).unwrap();
    for spec in ["2:4", "unstructured:0.5"] {
        let mut plain = original.clone();
        prune_with(&mut plain, spec, None);
        let mut recovered = original.clone();
        let report = prune_with(&mut recovered, &format!("{spec}:recover=oneshot"), Some(&cal_seqs));
        let mut totals = (0.0, 0.0);
        for (i, l) in prune::prunable_layers(&original).iter().enumerate() {
            let h = cal.gram_for(&original, l.node).unwrap();
            let w = prune::weight_kn(&original, l);
            let name = &original.const_of(l.weight).unwrap().name;
            // Linear layers keep their node; only the weight constant is new.
            let find = |g: &Graph| {
                prune::weight_kn(g, &calib::linear_layers(g).into_iter().find(|x| x.node == l.node).unwrap())
            };
            let e_plain = prune::rel_error(h, &w, &find(&plain), l.n);
            let e_rec = prune::rel_error(h, &w, &find(&recovered), l.n);
            // Random weights and near-white activations leave little to compensate: recovery must
            // not be worse anywhere, and must help in total.
            assert!(e_rec < e_plain, "{spec} {name}: recovered {e_rec} vs magnitude {e_plain}");
            eprintln!("{spec} {name}: recovered {e_rec:.4} vs magnitude {e_plain:.4}");
            totals.0 += e_plain;
            totals.1 += e_rec;
            // The report measures the same thing.
            let reported = report.layers[i].rel_error.unwrap();
            assert!((reported - e_rec).abs() < 1e-6 * (1.0 + e_rec), "{name}: {reported} vs {e_rec}");
            // Same mask: recovery only moves the kept weights.
            let (a, b) = (find(&plain), find(&recovered));
            assert!(a.iter().zip(&b).all(|(x, y)| (*x == 0.0) == (*y == 0.0)), "{spec} {name}: mask changed");
        }
        assert!(totals.1 < 0.9 * totals.0, "{spec}: total recovered {} vs magnitude {}", totals.1, totals.0);
    }
}

/// End to end on calibration data: the logits of the pruned model move closer to the original's with
/// recovery (sequential, one-shot and corrective), for every kind.
#[test]
fn recovery_brings_the_logits_closer() {
    let original = tiny_lm("model.onnx");
    let cal_seqs = seqs(4, 16, 5);
    let feeds = calib::lm_feeds(&original, &cal_seqs).unwrap();
    let base = run(&original, &feeds);
    for spec in ["2:4", "unstructured:0.6", "structured:0.3"] {
        let err = |suffix: &str| {
            let mut g = original.clone();
            prune_with(&mut g, &format!("{spec}{suffix}"), Some(&cal_seqs));
            mean_sq_diff(&run(&g, &feeds)[0].1, &base[0].1)
        };
        let (plain, seq, oneshot, corr) =
            (err(""), err(":recover"), err(":recover=oneshot"), err(":recover=corrective"));
        eprintln!("{spec}: plain {plain:.4}, sequential {seq:.4}, one-shot {oneshot:.4}, corrective {corr:.4}");
        assert!(
            seq < plain && oneshot < plain && corr < plain,
            "{spec}: plain {plain}, sequential {seq}, one-shot {oneshot}, corrective {corr}"
        );
    }
}

#[test]
fn structured_recovery_reduces_the_o_and_down_error() {
    let cal_seqs = seqs(4, 16, 9);
    let mut plain = tiny_lm("model.onnx");
    let a = prune_with(&mut plain, "structured:0.3", Some(&cal_seqs));
    let mut rec = tiny_lm("model.onnx");
    let b = prune_with(&mut rec, "structured:0.3:recover=oneshot", Some(&cal_seqs));
    let errs = |r: &PruneReport| -> Vec<f64> { r.layers.iter().filter_map(|l| l.rel_error).collect() };
    let (ea, eb) = (errs(&a), errs(&b));
    assert_eq!(ea.len(), 4, "o and down of both blocks");
    for (x, y) in ea.iter().zip(&eb) {
        assert!(y < x, "recovered {y} vs plain {x}");
    }
}

#[test]
fn calibration_collects_grams_and_channel_stats() {
    let g = tiny_lm("decoder_with_past.onnx");
    let s = seqs(2, 10, 11);
    let cal = Calibration::collect(&g, &s, &calib::Options { percentile: 100.0, channel_stats: true }).unwrap();
    assert_eq!(cal.tokens, 20);
    // q/k/v and gate/up share their input: 4 distinct inputs per block, plus lm_head's.
    assert_eq!(cal.gram.len(), 2 * 4 + 1);
    for l in calib::linear_layers(&g) {
        let h = cal.gram_for(&g, l.node).unwrap();
        assert_eq!((h.k, h.rows), (l.k, 20));
        let st = cal.stats_for(&g, l.node).unwrap();
        for i in 0..h.k {
            assert!((h.get(i, 3) - h.get(3, i)).abs() < 1e-9, "symmetric");
            // H_ii <= rows · max|x_i|², and the 100th percentile of |x| is max(|min|, |max|).
            let m = st.min[i].abs().max(st.max[i].abs());
            assert!(h.get(i, i) <= 20.0 * (m as f64).powi(2) * (1.0 + 1e-6));
            assert_eq!(st.abs_percentile[i], m);
        }
    }
    // Against an explicit XᵀX of the first block's MLP input.
    let mlp_in = calib::linear_layers(&g).into_iter().find(|l| l.n == 48).unwrap();
    let mut x: Option<Vec<f32>> = None;
    Interpreter::new(&g)
        .unwrap()
        .run_observed(&calib::lm_feeds(&g, &s).unwrap(), &mut |n, args| {
            if n == mlp_in.node {
                x = Some(args[0].unwrap().as_slice::<f32>().unwrap().to_vec());
            }
        })
        .unwrap();
    let x = x.unwrap();
    let h = cal.gram_for(&g, mlp_in.node).unwrap();
    for i in 0..32 {
        for j in 0..32 {
            let want: f64 = (0..20).map(|r| x[r * 32 + i] as f64 * x[r * 32 + j] as f64).sum();
            assert!((h.get(i, j) - want).abs() < 1e-4 * (1.0 + want.abs()), "H[{i},{j}] {} vs {want}", h.get(i, j));
        }
    }
}

#[test]
fn bad_specs_and_missing_calibration_are_clear_errors() {
    for bad in
        ["", "2:2", "4:2", "0:4", "unstructured", "unstructured:1.5", "structured:-0.1", "magnitude:0.5", "2:4:fast"]
    {
        let e = PruneSpec::parse(bad).unwrap_err().to_string();
        assert!(e.contains("--prune"), "{bad}: {e}");
    }
    assert_eq!(PruneSpec::parse("2:4:recover=oneshot").unwrap().recover, Recover::OneShot);
    let mut g = tiny_lm("model.onnx");
    let s = PruneSpec::parse("structured:0.3").unwrap();
    let e = prune::prune(&mut g, &s, "structured:0.3", None).unwrap_err().to_string();
    assert!(e.contains("--calibrate"), "{e}");
    // N:M needs K % M == 0 (K is 32 or 48 here).
    let s = PruneSpec::parse("3:7").unwrap();
    let e = prune::prune(&mut g, &s, "3:7", None).unwrap_err().to_string();
    assert!(e.contains("multiple of 7"), "{e}");
    // Token ids out of the vocabulary fail in the interpreter with an error, not a panic.
    let s = PruneSpec::parse("2:4:recover").unwrap();
    let r = prune::prune(&mut g, &s, "2:4:recover", Some(&[vec![5000, 1, 2]]));
    assert!(r.is_err());
}

/// `edgec compile --prune` as a user runs it: the report is printed, bad specs and missing
/// calibration are one-line errors.
#[test]
fn cli_prune_flags() {
    let dir = std::env::temp_dir().join(format!("edgec-prune-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("m.edgec");
    let run = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_edgec"))
            .args(args)
            .current_dir(common::repo_root())
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let model = "models/tiny-lm/model.onnx";
    let (ok, stdout, stderr) = run(&["compile", model, "--prune", "2:4", "-o", out.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("prune       2:4: parameters"), "{stdout}");
    assert!(stdout.contains("sparsity 0.500"), "{stdout}");
    for (args, want) in [
        (vec!["--prune", "2:5:x"], "unknown option"),
        (vec!["--prune", "structured:0.3"], "--calibrate"),
        (vec!["--recover"], "--recover needs --prune"),
        (vec!["--prune", "2:4", "--calibrate", "missing.txt"], "missing.txt"),
    ] {
        let mut a = vec!["compile", model, "-o", out.to_str().unwrap()];
        a.extend(args.iter().copied());
        let (ok, _, stderr) = run(&a);
        assert!(!ok && stderr.starts_with("error: ") && stderr.contains(want), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `edgec compile --prune` fuses after pruning: the shrunk attention (one query head per KV group
/// left) must still become one Attention op per block and compute the same.
#[test]
fn structured_pruned_graph_still_fuses() {
    for file in ["model.onnx", "decoder_with_past.onnx"] {
        let mut g = tiny_lm(file);
        prune_with(&mut g, "structured:0.3", Some(&seqs(2, 12, 1)));
        let feeds = calib::lm_feeds(&g, &seqs(2, 9, 7)).unwrap();
        let want = run(&g, &feeds);
        PassManager::parse("fuse-rms-norm,fuse-attention").unwrap().run(&mut g, &mut |_, _, _| {}).unwrap();
        let attention = g.g.node_weights().filter(|n| n.op.name() == "Attention").count();
        assert_eq!(attention, 2, "{file}");
        for ((name, a), (_, b)) in run(&g, &feeds).iter().zip(&want) {
            common::compare(a, b, 1e-5, 1e-5).unwrap_or_else(|e| panic!("{file} {name}: {e}"));
        }
    }
}

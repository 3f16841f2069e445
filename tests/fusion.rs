//! Operator fusion (passes/fuse_*.rs): the fused graph against the unfused one on the reference
//! interpreter, how many ops each model fuses, the patterns that must not fuse, and the fused ops
//! compiled natively (host, and aarch64/riscv64 under qemu) against the interpreter.
//!
//! Tolerance of fused vs unfused on the interpreter: rtol 1e-5, atol 1e-5 (logits have std ~4). The fused ops compute
//! in f64 end to end while the unfused chain rounds every intermediate to f32 (and Where masks
//! become additive), so results differ by float reassociation only.

mod common;

use common::qemu::{run_jobs, CrossArch};
use common::{attr_int, attr_ints, model, node, noise, value_info};
use edgec::codegen::{compile, run_model};
use edgec::interp::Interpreter;
use edgec::ir::{Graph, Op, Tensor};
use edgec::onnx::proto::{NodeProto, TensorProto};
use edgec::passes::PassManager;

const RTOL: f64 = 1e-5;
const ATOL: f64 = 1e-5;
/// Native kernels (f32, polynomial exp) vs the interpreter, as in tests/codegen.rs.
const NATIVE_RTOL: f64 = 1e-4;
const NATIVE_ATOL: f64 = 1e-5;

/// The pipeline before fusion existed.
const UNFUSED: &str = "const-fold,cse,dce";

type Feeds = Vec<(String, Tensor)>;

fn with_passes(g: &Graph, passes: &str) -> Graph {
    let mut g = g.clone();
    PassManager::parse(passes).unwrap().run(&mut g, &mut |_, _, _| {}).unwrap();
    g
}

fn run(g: &Graph, feeds: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    Interpreter::new(g).unwrap().run(feeds).unwrap()
}

fn count(g: &Graph, name: &str) -> usize {
    g.g.node_weights().filter(|n| n.op.name() == name).count()
}

/// (RMSNormalization, LayerNormalization, Attention, Softmax) in a graph.
fn census(g: &Graph) -> [usize; 4] {
    ["RMSNormalization", "LayerNormalization", "Attention", "Softmax"].map(|n| count(g, n))
}

fn assert_close(got: &[(String, Tensor)], want: &[(String, Tensor)], rtol: f64, atol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: output count");
    for ((n, g), (_, w)) in got.iter().zip(want) {
        common::compare(g, w, rtol, atol).unwrap_or_else(|e| panic!("{what} {n}: {e}"));
    }
}

/// Every fixture model: the default pipeline fuses what it should, and the fused graph computes
/// what the unfused one does.
#[test]
fn fused_models_match_unfused_on_the_interpreter() {
    let mut cases: Vec<(String, Graph, Feeds, [usize; 4])> = Vec::new();
    // (RMSNorm, LayerNorm, Attention, Softmax) after fusion.
    let expect = |name: &str| match name {
        "llama" | "llama_ext" => [5, 0, 2, 0],
        "gpt2" => [0, 5, 2, 0],
        "bert" | "bert_int8" => [0, 5, 2, 0],
        _ => [0, 0, 0, 0],
    };
    for (name, dir) in common::tiny_models() {
        let g = edgec::onnx::load_model(&dir.join("model.onnx")).unwrap();
        let feeds = common::read_npy_dir(&dir.join("inputs"));
        let e = expect(&name);
        cases.push((name, g, feeds, e));
    }
    for file in ["decoder_with_past", "model", "model_nomask"] {
        let g = edgec::onnx::load_model(&common::repo_root().join(format!("models/tiny-lm/{file}.onnx"))).unwrap();
        let feeds = common::tiny_lm_feeds(&g);
        cases.push((format!("tiny-lm/{file}"), g, feeds, [5, 0, 2, 0]));
    }
    for (name, g, feeds, want_census) in cases {
        let unfused = with_passes(&g, UNFUSED);
        let fused = with_passes(&g, "default");
        assert_eq!(census(&fused), want_census, "{name}: fused op counts (RMSNorm, LayerNorm, Attention, Softmax)");
        assert!(fused.op_count() < unfused.op_count() || want_census == [0; 4], "{name}");
        let want = run(&unfused, &feeds);
        let got = run(&fused, &feeds);
        assert_close(&got, &want, RTOL, ATOL, &name);
        println!("{name}: {} ops unfused, {} fused {:?}", unfused.op_count(), fused.op_count(), census(&fused));
    }
}

fn i64_init(name: &str, v: &[i64]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: vec![v.len() as i64],
        data_type: Some(7),
        int64_data: v.to_vec(),
        ..Default::default()
    }
}

fn scalar_init(name: &str, v: f32) -> TensorProto {
    TensorProto { name: Some(name.into()), dims: vec![], data_type: Some(1), float_data: vec![v], ..Default::default() }
}

fn with_attrs(mut n: NodeProto, attrs: Vec<edgec::onnx::proto::AttributeProto>) -> NodeProto {
    n.attribute = attrs;
    n
}

/// A model from nodes; inputs are (name, ONNX element type, dims).
fn load(nodes: Vec<NodeProto>, inputs: &[(&str, i32, &[&str])], outputs: &[&str], init: Vec<TensorProto>) -> Graph {
    let m = model(
        18,
        nodes,
        inputs.iter().map(|(n, t, d)| value_info(n, *t, d)).collect(),
        outputs.iter().map(|n| value_info(n, 1, &[])).collect(),
        init,
    );
    let bytes = prost::Message::encode_to_vec(&m);
    edgec::onnx::load_model_bytes(bytes.into(), None, "fusion test").unwrap()
}

/// RMSNorm spelled Mul(x, x) / Reciprocal / no weight, over 10 channels (not a multiple of 4).
fn rms_graph() -> Graph {
    load(
        vec![
            node("Mul", &["x", "x"], &["sq"]),
            node("ReduceMean", &["sq", "axes"], &["ms"]),
            node("Add", &["eps", "ms"], &["mse"]),
            node("Sqrt", &["mse"], &["rms"]),
            node("Reciprocal", &["rms"], &["inv"]),
            node("Mul", &["inv", "x"], &["y"]),
        ],
        &[("x", 1, &["3", "seq", "10"])],
        &["y"],
        vec![i64_init("axes", &[-1]), scalar_init("eps", 1e-5)],
    )
}

/// LayerNorm decomposed with Mul(d, Reciprocal(std)) and a gamma but no beta, 12 channels.
fn layer_norm_graph() -> Graph {
    load(
        vec![
            node("ReduceMean", &["x", "axes"], &["mean"]),
            node("Sub", &["x", "mean"], &["d"]),
            node("Pow", &["d", "two"], &["sq"]),
            node("ReduceMean", &["sq", "axes"], &["var"]),
            node("Add", &["var", "eps"], &["ve"]),
            node("Sqrt", &["ve"], &["std"]),
            node("Reciprocal", &["std"], &["inv"]),
            node("Mul", &["d", "inv"], &["n"]),
            node("Mul", &["gamma", "n"], &["y"]),
        ],
        &[("x", 1, &["seq", "12"])],
        &["y"],
        vec![
            i64_init("axes", &[-1]),
            scalar_init("two", 2.0),
            scalar_init("eps", 1e-5),
            common::f32_initializer("gamma", &[12], &noise(12, 7)),
        ],
    )
}

/// Attention with part of the scale on q, k in [b, t, h, d] layout (k^T = one Transpose with
/// perm [0,2,3,1]), v through repeat_kv's Unsqueeze/Expand/Reshape from `kv_heads` heads, a
/// boolean mask through Where(keep, scores, lowest) and an additive bias after it; batch 2,
/// head_dim 10 (not a multiple of 4), `seq` queries and `kv` keys.
fn attention_graph(heads: i64, kv_heads: i64) -> Graph {
    let g = heads / kv_heads;
    let mut unsq = node("Unsqueeze", &["v", "ax2"], &["vu"]);
    unsq.name = Some("unsq_v".into());
    load(
        vec![
            node("Mul", &["q", "qscale"], &["qs"]),
            with_attrs(node("Transpose", &["kraw"], &["kt"]), vec![attr_ints("perm", &[0, 2, 3, 1])]),
            node("MatMul", &["qs", "kt"], &["scores"]),
            node("Div", &["scores", "div"], &["scaled"]),
            node("Where", &["keep", "scaled", "lowest"], &["masked"]),
            node("Add", &["bias", "masked"], &["biased"]),
            with_attrs(node("Softmax", &["biased"], &["p"]), vec![attr_int("axis", -1)]),
            unsq,
            node("Expand", &["vu", "vshape5"], &["ve"]),
            node("Reshape", &["ve", "vshape4"], &["vr"]),
            node("MatMul", &["p", "vr"], &["y"]),
        ],
        &[
            ("q", 1, &["2", &heads.to_string(), "seq", "10"]),
            // k holds every query head: [b, t, h, d].
            ("kraw", 1, &["2", "kv", &heads.to_string(), "10"]),
            ("v", 1, &["2", &kv_heads.to_string(), "kv", "10"]),
            ("keep", 9, &["seq", "kv"]),
            ("bias", 1, &["2", "1", "1", "kv"]),
        ],
        &["y"],
        vec![
            scalar_init("qscale", 0.5),
            scalar_init("div", 0.7),
            scalar_init("lowest", f32::MIN),
            i64_init("ax2", &[2]),
            i64_init("vshape5", &[1, 1, g, 1, 1]),
            i64_init("vshape4", &[2, heads, -1, 10]),
        ],
    )
}

fn attention_feeds(heads: usize, kv_heads: usize, seq: usize, kv: usize) -> Vec<(String, Tensor)> {
    let keep: Vec<bool> = (0..seq * kv).map(|i| (i % kv) <= (i / kv) + kv - seq).collect();
    vec![
        ("q".into(), Tensor::from_vec(vec![2, heads, seq, 10], noise(2 * heads * seq * 10, 1))),
        ("kraw".into(), Tensor::from_vec(vec![2, kv, heads, 10], noise(2 * kv * heads * 10, 2))),
        ("v".into(), Tensor::from_vec(vec![2, kv_heads, kv, 10], noise(2 * kv_heads * kv * 10, 3))),
        ("keep".into(), Tensor::from_vec(vec![seq, kv], keep)),
        ("bias".into(), Tensor::from_vec(vec![2, 1, 1, kv], noise(2 * kv, 4))),
    ]
}

#[test]
fn hand_written_patterns_fuse_and_match() {
    let g = rms_graph();
    let fused = with_passes(&g, "default");
    assert_eq!(census(&fused)[0], 1, "{}", edgec::ir::text::render(&fused));
    assert_eq!(fused.op_count(), 1, "the whole chain is one op:\n{}", edgec::ir::text::render(&fused));
    let feeds = vec![("x".to_string(), Tensor::from_vec(vec![3, 5, 10], noise(150, 9)))];
    assert_close(&run(&fused, &feeds), &run(&g, &feeds), RTOL, ATOL, "rms");

    let g = layer_norm_graph();
    let fused = with_passes(&g, "default");
    assert_eq!(census(&fused)[1], 1, "{}", edgec::ir::text::render(&fused));
    assert_eq!(fused.op_count(), 1, "the whole chain is one op:\n{}", edgec::ir::text::render(&fused));
    let feeds = vec![("x".to_string(), Tensor::from_vec(vec![5, 12], noise(60, 8)))];
    assert_close(&run(&fused, &feeds), &run(&g, &feeds), RTOL, ATOL, "layer norm");

    // 6 query heads over 6 k heads: k carries every head, v is repeated from 2 kv heads. The
    // fused op needs k and v with the same head count, so this one must NOT fuse...
    let g = attention_graph(6, 2);
    let fused = with_passes(&g, "default");
    assert_eq!(census(&fused)[2], 0, "k and v head counts differ:\n{}", edgec::ir::text::render(&fused));
    // ...while with v un-repeated (kv_heads = heads) it does, k via one new Transpose.
    let g = attention_graph(6, 6);
    let fused = with_passes(&g, "default");
    let text = edgec::ir::text::render(&fused);
    assert_eq!(census(&fused), [0, 0, 1, 0], "{text}");
    assert!(text.contains("scale=0.71428"), "q scale 0.5 / 0.7 folded into the op:\n{text}");
    let feeds = attention_feeds(6, 6, 5, 7);
    assert_close(&run(&fused, &feeds), &run(&g, &feeds), RTOL, ATOL, "attention");
}

/// Patterns that look like the fused ones but are not equal to them stay unfused.
#[test]
fn near_misses_stay_unfused() {
    // Where with -10000 (old BERT): a fully masked row would differ from an additive mask.
    let g = load(
        vec![
            node("MatMul", &["q", "kt"], &["scores"]),
            node("Where", &["keep", "scores", "lowest"], &["masked"]),
            with_attrs(node("Softmax", &["masked"], &["p"]), vec![attr_int("axis", -1)]),
            node("MatMul", &["p", "v"], &["y"]),
        ],
        &[
            ("q", 1, &["1", "2", "3", "4"]),
            ("kt", 1, &["1", "2", "4", "5"]),
            ("keep", 9, &["3", "5"]),
            ("v", 1, &["1", "2", "5", "4"]),
        ],
        &["y"],
        vec![scalar_init("lowest", -10000.0)],
    );
    let fused = with_passes(&g, "default");
    assert_eq!(census(&fused), [0, 0, 0, 1], "{}", edgec::ir::text::render(&fused));

    // A mask added before the scale would be scaled too: left alone.
    let m = model(
        18,
        vec![
            node("MatMul", &["q", "kt"], &["scores"]),
            node("Add", &["scores", "mask"], &["masked"]),
            node("Mul", &["masked", "c"], &["scaled"]),
            with_attrs(node("Softmax", &["scaled"], &["p"]), vec![attr_int("axis", -1)]),
            node("MatMul", &["p", "v"], &["y"]),
        ],
        vec![
            value_info("q", 1, &["1", "2", "3", "4"]),
            value_info("kt", 1, &["1", "2", "4", "5"]),
            value_info("mask", 1, &["3", "5"]),
            value_info("v", 1, &["1", "2", "5", "4"]),
        ],
        vec![value_info("y", 1, &[])],
        vec![scalar_init("c", 0.5)],
    );
    let g = edgec::onnx::load_model_bytes(prost::Message::encode_to_vec(&m).into(), None, "near miss").unwrap();
    let fused = with_passes(&g, "default");
    assert_eq!(census(&fused)[2], 0, "{}", edgec::ir::text::render(&fused));

    // An intermediate that is also a graph output keeps the chain (nothing to save).
    let m = model(
        18,
        vec![
            node("Mul", &["x", "x"], &["sq"]),
            node("ReduceMean", &["sq", "axes"], &["ms"]),
            node("Add", &["ms", "eps"], &["mse"]),
            node("Sqrt", &["mse"], &["rms"]),
            node("Div", &["x", "rms"], &["y"]),
        ],
        vec![value_info("x", 1, &["2", "8"])],
        vec![value_info("y", 1, &[]), value_info("ms", 1, &[])],
        vec![i64_init("axes", &[-1]), scalar_init("eps", 1e-6)],
    );
    let g = edgec::onnx::load_model_bytes(prost::Message::encode_to_vec(&m).into(), None, "near miss").unwrap();
    assert_eq!(census(&with_passes(&g, "default"))[0], 0);
}

/// Bad shapes for the fused ops are errors, not panics, in the interpreter.
#[test]
fn fused_ops_reject_bad_shapes() {
    use edgec::interp::eval_op;
    let t = |shape: Vec<usize>| Tensor::from_vec(shape.clone(), vec![0.5f32; shape.iter().product()]);
    let att = Op::Attention { scale: 1.0 };
    let (q, k3, k, v) = (t(vec![1, 4, 2, 8]), t(vec![1, 3, 5, 8]), t(vec![1, 2, 5, 8]), t(vec![1, 2, 5, 8]));
    assert!(eval_op(&att, &[Some(&q), Some(&k3), Some(&k3), None], 1).unwrap_err().contains("multiple"));
    assert!(eval_op(&att, &[Some(&q), Some(&k), Some(&t(vec![1, 2, 4, 8])), None], 1).is_err());
    assert!(eval_op(&att, &[Some(&t(vec![4, 2, 8])), Some(&k), Some(&v), None], 1).unwrap_err().contains("rank 4"));
    let bad_mask = t(vec![3, 5]);
    assert!(eval_op(&att, &[Some(&q), Some(&k), Some(&v), Some(&bad_mask)], 1).unwrap_err().contains("broadcast"));
    assert!(eval_op(&att, &[Some(&q), Some(&k), Some(&v)], 1).is_ok());
    let rms = Op::RmsNorm { axis: -1, epsilon: 1e-5 };
    assert!(eval_op(&rms, &[Some(&t(vec![2, 8])), Some(&t(vec![3]))], 1).unwrap_err().contains("broadcast"));
    assert!(eval_op(&rms, &[Some(&t(vec![2, 8])), Some(&t(vec![8]))], 2 - 1).is_ok());
    assert!(eval_op(&Op::RmsNorm { axis: 5, epsilon: 1e-5 }, &[Some(&t(vec![2, 8])), Some(&t(vec![8]))], 1).is_err());
}

/// The fused ops compiled for this machine (threads 1..3: the attention is large enough to be
/// split over `parallel_for`) and for aarch64/riscv64 under qemu, against the interpreter.
#[test]
fn fused_ops_run_natively() {
    let cases: Vec<(&str, Graph, Feeds)> = vec![
        (
            "rms",
            with_passes(&rms_graph(), "default"),
            vec![("x".to_string(), Tensor::from_vec(vec![3, 7, 10], noise(210, 5)))],
        ),
        (
            "layer norm",
            with_passes(&layer_norm_graph(), "default"),
            vec![("x".to_string(), Tensor::from_vec(vec![5, 12], noise(60, 8)))],
        ),
        ("attention small", with_passes(&attention_graph(6, 6), "default"), attention_feeds(6, 6, 5, 7)),
        ("attention parallel", with_passes(&attention_graph(6, 6), "default"), attention_feeds(6, 6, 40, 67)),
        (
            "tiny-lm decoder",
            {
                let g = edgec::onnx::load_model(&common::repo_root().join("models/tiny-lm/decoder_with_past.onnx"))
                    .unwrap();
                with_passes(&g, "default")
            },
            Vec::new(),
        ),
    ];
    let mut jobs_by_arch: Vec<(CrossArch, Vec<common::qemu::Job>, Vec<Vec<Tensor>>)> =
        CrossArch::CROSS.iter().map(|&a| (a, Vec::new(), Vec::new())).collect();
    for (name, g, feeds) in cases {
        let feeds = if feeds.is_empty() { common::tiny_lm_feeds(&g) } else { feeds };
        let fused_ops = census(&g);
        assert!(fused_ops[0] + fused_ops[1] + fused_ops[2] > 0, "{name}: nothing fused");
        let want = run(&g, &feeds);
        let c = compile(&g, &common::native::test_options("host")).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut model = edgec_runtime::Model::from_bytes(&c.artifact().unwrap()).unwrap();
        for threads in [1, 2, 3] {
            model.set_threads(threads);
            let got = run_model(&model, &feeds).unwrap();
            assert_close(&got, &want, NATIVE_RTOL, NATIVE_ATOL, &format!("{name} host, {threads} threads"));
        }
        let inputs: Vec<Tensor> = common::native::input_names(&g)
            .iter()
            .map(|n| feeds.iter().find(|(f, _)| f == n).unwrap().1.clone())
            .collect();
        let want: Vec<Tensor> = want.into_iter().map(|(_, t)| t).collect();
        for (arch, jobs, wants) in &mut jobs_by_arch {
            jobs.push(common::native::cross_job(name, &g, &inputs, &want, arch.name()).unwrap());
            wants.push(want.clone());
        }
    }
    for (arch, jobs, wants) in jobs_by_arch {
        let outs = run_jobs(arch, &jobs, None).unwrap_or_else(|e| panic!("{}: {e}", arch.name()));
        for ((job, raw), want) in jobs.iter().zip(outs).zip(&wants) {
            let got = common::native::decode_outputs(&raw, want).unwrap();
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                common::compare(g, w, NATIVE_RTOL, NATIVE_ATOL)
                    .unwrap_or_else(|e| panic!("{} on {} output {i}: {e}", job.name, arch.name()));
            }
        }
    }
}

// ---- matmul fusions: epilogue (bias + activation), SwiGLU, merged q/k/v ----

/// The pipeline before weight quantization, and the matmul fusions that follow it.
const PRE_QUANTIZE: &str = "qdq-weights,const-fold,cse,dce,fuse-layer-norm,fuse-rms-norm,fuse-attention";
const MATMUL_FUSIONS: &str = "fuse-swiglu,fuse-matmul-epilogue,fuse-qkv,fuse-elementwise";
/// The default pipeline without the elementwise fusion (which would take what the near misses
/// leave unfused).
const NO_ELEMENTWISE: &str =
    "qdq-weights,const-fold,cse,dce,fuse-layer-norm,fuse-rms-norm,fuse-attention,fuse-swiglu,fuse-matmul-epilogue,fuse-qkv";

fn weight(name: &str, k: usize, n: usize, seed: u64) -> TensorProto {
    let w: Vec<f32> = noise(k * n, seed).iter().map(|v| v * 0.3).collect();
    common::f32_initializer(name, &[k as i64, n as i64], &w)
}

/// The ops that compute `act` from `h` into `y`, as exporters write them.
fn activation_nodes(act: &str) -> Vec<NodeProto> {
    match act {
        "relu" | "sigmoid" | "tanh" => {
            let op = match act {
                "relu" => "Relu",
                "sigmoid" => "Sigmoid",
                _ => "Tanh",
            };
            vec![node(op, &["h"], &["y"])]
        }
        "silu" => vec![node("Sigmoid", &["h"], &["s"]), node("Mul", &["s", "h"], &["y"])],
        // BERT: x * 0.5 * (1 + erf(x / sqrt 2)).
        "gelu" => vec![
            node("Div", &["h", "sqrt2"], &["z"]),
            node("Erf", &["z"], &["e"]),
            node("Add", &["e", "one"], &["e1"]),
            node("Mul", &["h", "e1"], &["m"]),
            node("Mul", &["m", "half"], &["y"]),
        ],
        // GPT-2's gelu_new with Pow(x, 3).
        "gelu_tanh" => vec![
            node("Pow", &["h", "three"], &["c"]),
            node("Mul", &["k044", "c"], &["c2"]),
            node("Add", &["h", "c2"], &["in"]),
            node("Mul", &["kc", "in"], &["t0"]),
            node("Tanh", &["t0"], &["t"]),
            node("Add", &["one", "t"], &["t1"]),
            node("Mul", &["half", "h"], &["hh"]),
            node("Mul", &["hh", "t1"], &["y"]),
        ],
        // The same with x * x * x.
        "gelu_tanh_mul" => vec![
            node("Mul", &["h", "h"], &["h2"]),
            node("Mul", &["h2", "h"], &["c"]),
            node("Mul", &["c", "k044"], &["c2"]),
            node("Add", &["c2", "h"], &["in"]),
            node("Mul", &["in", "kc"], &["t0"]),
            node("Tanh", &["t0"], &["t"]),
            node("Add", &["t", "one"], &["t1"]),
            node("Mul", &["h", "half"], &["hh"]),
            node("Mul", &["t1", "hh"], &["y"]),
        ],
        _ => panic!("no activation {act}"),
    }
}

fn act_constants() -> Vec<TensorProto> {
    vec![
        scalar_init("sqrt2", std::f32::consts::SQRT_2),
        scalar_init("one", 1.0),
        scalar_init("half", 0.5),
        scalar_init("three", 3.0),
        scalar_init("k044", 0.044715),
        scalar_init("kc", (2.0f32 / std::f32::consts::PI).sqrt()),
    ]
}

/// `act(x @ W + b)` with x [2, seq, k], W [k, n]; `extra_out` also makes an intermediate a graph
/// output (a near miss).
fn epilogue_graph(act: &str, k: usize, n: usize, extra_out: Option<&str>) -> Graph {
    let mut nodes = vec![node("MatMul", &["x", "w"], &["p"]), node("Add", &["p", "b"], &["h"])];
    nodes.extend(activation_nodes(act));
    let mut init = vec![weight("w", k, n, 3), common::f32_initializer("b", &[n as i64], &noise(n, 4))];
    init.extend(act_constants());
    let ks = k.to_string();
    let mut outs = vec!["y"];
    outs.extend(extra_out);
    load(nodes, &[("x", 1, &["2", "seq", &ks])], &outs, init)
}

/// SmolLM2's MLP: down(silu(x @ Wg) * (x @ Wu)).
fn swiglu_graph(k: usize, n: usize, extra_out: Option<&str>) -> Graph {
    let nodes = vec![
        node("MatMul", &["x", "wg"], &["g"]),
        node("Sigmoid", &["g"], &["s"]),
        node("Mul", &["g", "s"], &["silu"]),
        node("MatMul", &["x", "wu"], &["u"]),
        node("Mul", &["silu", "u"], &["m"]),
        node("MatMul", &["m", "wd"], &["y"]),
    ];
    let ks = k.to_string();
    let mut outs = vec!["y"];
    outs.extend(extra_out);
    let init = vec![weight("wg", k, n, 5), weight("wu", k, n, 6), weight("wd", n, k, 7)];
    load(nodes, &[("x", 1, &["2", "seq", &ks])], &outs, init)
}

/// q/k/v projections of one input, each read by a Neg; `v_input` makes v's weight a graph input.
fn qkv_graph(k: usize, nq: usize, nkv: usize, v_input: bool) -> Graph {
    let nodes = vec![
        node("MatMul", &["x", "wq"], &["q"]),
        node("MatMul", &["x", "wk"], &["kk"]),
        node("MatMul", &["x", "wv"], &["v"]),
        node("Neg", &["q"], &["oq"]),
        node("Neg", &["kk"], &["ok"]),
        node("Neg", &["v"], &["ov"]),
    ];
    let ks = k.to_string();
    let nv = nkv.to_string();
    let mut init = vec![weight("wq", k, nq, 8), weight("wk", k, nkv, 9)];
    let x_dims = ["2", "seq", ks.as_str()];
    let mut inputs: Vec<(&str, i32, &[&str])> = vec![("x", 1, &x_dims)];
    let wv_dims = [ks.as_str(), nv.as_str()];
    if v_input {
        inputs.push(("wv", 1, &wv_dims));
    } else {
        init.push(weight("wv", k, nkv, 10));
    }
    load(nodes, &inputs, &["oq", "ok", "ov"], init)
}

fn x_feed(seq: usize, k: usize) -> Feeds {
    vec![("x".to_string(), Tensor::from_vec(vec![2, seq, k], noise(2 * seq * k, 11)))]
}

/// The MatMulAct nodes' attribute strings.
fn fused_matmuls(g: &Graph) -> Vec<String> {
    g.g.node_weights().filter(|n| n.op.name() == "MatMulAct").map(|n| n.op.attrs().join(" ")).collect()
}

/// `g` quantized with `scheme` the way `edgec compile --quantize` does it: (unfused, fused).
fn quantized(g: &Graph, scheme: &str) -> (Graph, Graph) {
    let mut q = with_passes(g, PRE_QUANTIZE);
    let pass = edgec::passes::quantize::Quantize::new(scheme.parse().unwrap(), vec![]);
    edgec::passes::Pass::run(&pass, &mut q).unwrap();
    let fused = with_passes(&q, MATMUL_FUSIONS);
    (q, fused)
}

#[test]
fn matmul_fusions_fuse_and_match() {
    for (act, want) in [
        ("relu", "act=relu"),
        ("sigmoid", "act=sigmoid"),
        ("tanh", "act=tanh"),
        ("silu", "act=silu"),
        ("gelu", "act=gelu"),
        ("gelu_tanh", "act=gelu_tanh"),
        ("gelu_tanh_mul", "act=gelu_tanh"),
    ] {
        let g = epilogue_graph(act, 24, 40, None);
        let fused = with_passes(&g, "default");
        let text = edgec::ir::text::render(&fused);
        assert_eq!(fused_matmuls(&fused), vec![want.to_string()], "{act}:\n{text}");
        assert_eq!(fused.op_count(), 1, "{act}: one op:\n{text}");
        let feeds = x_feed(5, 24);
        assert_close(&run(&fused, &feeds), &run(&g, &feeds), RTOL, ATOL, act);
    }
    // SwiGLU: one gated matmul (weights [24, 80]) and down_proj.
    let g = swiglu_graph(24, 40, None);
    let fused = with_passes(&g, "default");
    let text = edgec::ir::text::render(&fused);
    assert_eq!(fused_matmuls(&fused), vec!["act=silu glu=true".to_string()], "{text}");
    assert_eq!(fused.op_count(), 2, "{text}");
    assert!(text.contains("f32[24,80]"), "{text}");
    let feeds = x_feed(5, 24);
    assert_close(&run(&fused, &feeds), &run(&g, &feeds), RTOL, ATOL, "swiglu");
    // q/k/v: one matmul over [24, 56] and a Split.
    let g = qkv_graph(24, 40, 8, false);
    let fused = with_passes(&g, "default");
    let text = edgec::ir::text::render(&fused);
    assert_eq!(count(&fused, "MatMul"), 1, "{text}");
    assert_eq!(count(&fused, "Split"), 1, "{text}");
    assert!(text.contains("f32[24,56]"), "{text}");
    assert_close(&run(&fused, &feeds), &run(&g, &feeds), RTOL, ATOL, "qkv");
    // Quantized weights: the same fusions on MatMulNBits, per-column records concatenated.
    for scheme in ["int8", "int4", "w4a8", "int4:g16:asym"] {
        let (q, fused) = quantized(&swiglu_graph(32, 40, None), scheme);
        let attrs = fused_matmuls(&fused);
        assert!(attrs.len() == 1 && attrs[0].contains("glu=true") && attrs[0].contains("N=80"), "{scheme}: {attrs:?}");
        let feeds = x_feed(5, 32);
        assert_close(&run(&fused, &feeds), &run(&q, &feeds), RTOL, ATOL, &format!("swiglu {scheme}"));
        let (q, fused) = quantized(&epilogue_graph("gelu", 32, 40, None), scheme);
        assert_eq!(fused_matmuls(&fused).len(), 1, "{scheme}");
        assert!(fused_matmuls(&fused)[0].starts_with("act=gelu K=32 N=40"), "{scheme}: {:?}", fused_matmuls(&fused));
        assert_close(&run(&fused, &feeds), &run(&q, &feeds), RTOL, ATOL, &format!("gelu {scheme}"));
        let (q, fused) = quantized(&qkv_graph(32, 40, 8, false), scheme);
        assert_eq!((count(&fused, "MatMulNBits"), count(&fused, "Split")), (1, 1), "{scheme}");
        assert_close(&run(&fused, &feeds), &run(&q, &feeds), RTOL, ATOL, &format!("qkv {scheme}"));
    }
}

/// Matmul patterns whose intermediates have other readers (or weights that are not constant)
/// keep those parts unfused.
#[test]
fn matmul_near_misses_stay_unfused() {
    // The pre-activation value is also an output: bias fused, activation left as written.
    let fused = with_passes(&epilogue_graph("gelu", 24, 40, Some("h")), NO_ELEMENTWISE);
    assert_eq!(fused_matmuls(&fused), vec!["act=none".to_string()]);
    assert_eq!(count(&fused, "Erf"), 1);
    // The sigmoid of a SiLU has another reader.
    let fused = with_passes(&epilogue_graph("silu", 24, 40, Some("s")), NO_ELEMENTWISE);
    assert_eq!(fused_matmuls(&fused), vec!["act=none".to_string()]);
    // The matmul product itself is an output: the bias Add stays.
    let fused = with_passes(&epilogue_graph("relu", 24, 40, Some("p")), NO_ELEMENTWISE);
    assert!(fused_matmuls(&fused).is_empty() && count(&fused, "Add") == 1);
    // SwiGLU whose gate product is also read elsewhere: no gated matmul (gate and up are still
    // merged as two projections of one input).
    let fused = with_passes(&swiglu_graph(24, 40, Some("g")), NO_ELEMENTWISE);
    assert!(fused_matmuls(&fused).iter().all(|a| !a.contains("glu")), "{:?}", fused_matmuls(&fused));
    assert_eq!(count(&fused, "Sigmoid"), 1);
    // v's weight is a graph input: only q and k merge.
    let g = qkv_graph(24, 40, 8, true);
    let fused = with_passes(&g, NO_ELEMENTWISE);
    let text = edgec::ir::text::render(&fused);
    assert_eq!(count(&fused, "MatMul"), 2, "{text}");
    assert!(text.contains("f32[24,48]"), "{text}");
    let mut feeds = x_feed(5, 24);
    feeds.push(("wv".to_string(), Tensor::from_vec(vec![24, 8], noise(192, 12))));
    assert_close(&run(&fused, &feeds), &run(&g, &feeds), RTOL, ATOL, "qkv near miss");
    // Different quantization schemes do not share a weight.
    let mut q = with_passes(&qkv_graph(32, 40, 8, false), PRE_QUANTIZE);
    let mut pass = edgec::passes::quantize::Quantize::new("int4".parse().unwrap(), vec![]);
    pass.rules.push(edgec::passes::quantize::Rule {
        pattern: "wv".into(),
        exact: false,
        precision: Some("int8".parse().unwrap()),
    });
    edgec::passes::Pass::run(&pass, &mut q).unwrap();
    let fused = with_passes(&q, MATMUL_FUSIONS);
    assert_eq!(count(&fused, "MatMulNBits"), 2, "{}", edgec::ir::text::render(&fused));
}

/// The fused matmuls natively (host at 1-3 threads, aarch64 and riscv64 under qemu) against the
/// interpreter: every activation, SwiGLU with N not a multiple of 16, merged q/k/v, each in f32
/// and with quantized weights (weight-only and int8 activations), sizes above the parallel
/// threshold.
#[test]
fn matmul_fusions_run_natively() {
    let mut cases: Vec<(String, Graph, Feeds)> = Vec::new();
    for act in ["relu", "sigmoid", "tanh", "silu", "gelu", "gelu_tanh"] {
        cases.push((
            format!("epilogue {act}"),
            with_passes(&epilogue_graph(act, 24, 40, None), "default"),
            x_feed(5, 24),
        ));
    }
    cases.push(("swiglu".into(), with_passes(&swiglu_graph(24, 40, None), "default"), x_feed(5, 24)));
    cases.push(("swiglu parallel".into(), with_passes(&swiglu_graph(64, 72, None), "default"), x_feed(40, 64)));
    cases.push(("qkv".into(), with_passes(&qkv_graph(24, 40, 8, false), "default"), x_feed(1, 24)));
    cases.push(("elementwise".into(), with_passes(&elementwise_graph(false), "default"), elementwise_feeds()));
    for scheme in ["int8", "int4", "w4a8", "w8a8", "int4:g16:asym"] {
        cases.push((format!("swiglu {scheme}"), quantized(&swiglu_graph(64, 40, None), scheme).1, x_feed(5, 64)));
        cases.push((
            format!("swiglu parallel {scheme}"),
            quantized(&swiglu_graph(64, 72, None), scheme).1,
            x_feed(40, 64),
        ));
        cases.push((
            format!("gelu {scheme}"),
            quantized(&epilogue_graph("gelu_tanh", 64, 40, None), scheme).1,
            x_feed(5, 64),
        ));
        cases.push((format!("qkv {scheme}"), quantized(&qkv_graph(64, 40, 8, false), scheme).1, x_feed(1, 64)));
    }
    let mut jobs_by_arch: Vec<(CrossArch, Vec<common::qemu::Job>, Vec<Vec<Tensor>>)> =
        CrossArch::CROSS.iter().map(|&a| (a, Vec::new(), Vec::new())).collect();
    for (name, g, feeds) in &cases {
        let fused = fused_matmuls(g).len() + count(g, "Split") + count(g, "Elementwise");
        assert!(fused > 0, "{name}: nothing fused");
        let want = run(g, feeds);
        let c = compile(g, &common::native::test_options("host")).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut model = edgec_runtime::Model::from_bytes(&c.artifact().unwrap()).unwrap();
        for threads in [1, 2, 3] {
            model.set_threads(threads);
            let got = run_model(&model, feeds).unwrap();
            assert_close(&got, &want, NATIVE_RTOL, NATIVE_ATOL, &format!("{name} host, {threads} threads"));
        }
        let inputs: Vec<Tensor> = common::native::input_names(g)
            .iter()
            .map(|n| feeds.iter().find(|(f, _)| f == n).unwrap().1.clone())
            .collect();
        let want: Vec<Tensor> = want.into_iter().map(|(_, t)| t).collect();
        for (arch, jobs, wants) in &mut jobs_by_arch {
            jobs.push(common::native::cross_job(name, g, &inputs, &want, arch.name()).unwrap());
            wants.push(want.clone());
        }
    }
    for (arch, jobs, wants) in jobs_by_arch {
        let outs = run_jobs(arch, &jobs, None).unwrap_or_else(|e| panic!("{}: {e}", arch.name()));
        for ((job, raw), want) in jobs.iter().zip(outs).zip(&wants) {
            let got = common::native::decode_outputs(&raw, want).unwrap();
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                common::compare(g, w, NATIVE_RTOL, NATIVE_ATOL)
                    .unwrap_or_else(|e| panic!("{} on {} output {i}: {e}", job.name, arch.name()));
            }
        }
    }
}

/// `sigmoid(x * a + b) * exp(-x) - x / c` over x [2, seq, 12], with a [12] and b, c scalars
/// broadcast; `extra_out` also makes `x * a + b` a graph output.
fn elementwise_graph(extra_out: bool) -> Graph {
    let nodes = vec![
        node("Mul", &["x", "a"], &["xa"]),
        node("Add", &["xa", "b"], &["h"]),
        node("Sigmoid", &["h"], &["s"]),
        node("Neg", &["x"], &["nx"]),
        node("Exp", &["nx"], &["e"]),
        node("Mul", &["s", "e"], &["se"]),
        node("Div", &["x", "c"], &["xc"]),
        node("Sub", &["se", "xc"], &["y"]),
    ];
    let mut outs = vec!["y"];
    if extra_out {
        outs.push("h");
    }
    let init = vec![common::f32_initializer("a", &[12], &noise(12, 13)), scalar_init("b", 0.25)];
    load(nodes, &[("x", 1, &["2", "seq", "12"]), ("c", 1, &[])], &outs, init)
}

fn elementwise_feeds() -> Feeds {
    vec![
        ("x".to_string(), Tensor::from_vec(vec![2, 7, 12], noise(168, 14))),
        ("c".to_string(), Tensor::from_vec(vec![], vec![1.5f32])),
    ]
}

#[test]
fn elementwise_chains_fuse_and_match() {
    let g = elementwise_graph(false);
    let fused = with_passes(&g, "default");
    let text = edgec::ir::text::render(&fused);
    assert_eq!((fused.op_count(), count(&fused, "Elementwise")), (1, 1), "{text}");
    assert!(text.contains("expr=Sub(Mul(Sigmoid(Add(Mul(i0,i1),i2)),Exp(Neg(i0))),Div(i0,i3))"), "{text}");
    let feeds = elementwise_feeds();
    assert_close(&run(&fused, &feeds), &run(&g, &feeds), RTOL, ATOL, "elementwise");
    // `h` is also an output: the tree splits there (Mul+Add, and the rest reading h).
    let g = elementwise_graph(true);
    let fused = with_passes(&g, "default");
    let text = edgec::ir::text::render(&fused);
    assert_eq!(count(&fused, "Elementwise"), 2, "{text}");
    assert_close(&run(&fused, &feeds), &run(&g, &feeds), RTOL, ATOL, "elementwise split");
}

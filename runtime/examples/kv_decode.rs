//! Decode speed with the KV cache kept in the arena (`Model::run_cached`) against the same
//! artifact run the plain way (`Model::run`: the past passed in, the present handed back and fed
//! again, so the generated code copies the whole cache in and out every token). Both loops run
//! in one process, alternating, after a prompt of each length; prints a Markdown table of median
//! milliseconds per token. A benchmark (benches/kv_cache.sh), not a test.
//!
//!   cargo run --release -p edgec-runtime --example kv_decode -- MODEL.edgec [PROMPTS] [TOKENS] [REPEAT]
//!   (PROMPTS: comma-separated prompt lengths, default 16,256,768; TOKENS default 32; REPEAT default 3)

use std::time::Instant;

use edgec_runtime::lm::{empty_past, LmSpec};
use edgec_runtime::{DType, Model, Tensor, TensorView};

fn feeds(spec: &LmSpec, ids: &[i64], past: usize) -> Vec<(usize, Tensor)> {
    let n = ids.len();
    let mut f = vec![(spec.input_ids, Tensor::from_slice(vec![1, n], ids).unwrap())];
    if let Some(i) = spec.attention_mask {
        f.push((i, Tensor::from_slice(vec![1, past + n], &vec![1i64; past + n]).unwrap()));
    }
    if let Some(i) = spec.position_ids {
        let pos: Vec<i64> = (past..past + n).map(|p| p as i64).collect();
        f.push((i, Tensor::from_slice(vec![1, n], &pos).unwrap()));
    }
    f
}

/// Prompt of `prompt` tokens, then `tokens` single-token steps; returns seconds per decode step.
fn decode(model: &Model, spec: &LmSpec, prompt: usize, tokens: usize, in_arena: bool) -> f64 {
    let n_in = model.inputs().len();
    let ids: Vec<i64> = (0..prompt as i64).map(|i| 100 + i % 1000).collect();
    let mut cache = model.kv_cache().expect("the artifact keeps its KV cache in the arena");
    // Plain runs: per cache input, the tensor fed back (empty at first).
    let mut past: Vec<Tensor> =
        model.meta().kv_cache.iter().map(|s| empty_past(model, s.input, s.axis).unwrap()).collect();
    let mut len = 0;
    let mut step = |ids: &[i64], len: usize| {
        let f = feeds(spec, ids, len);
        let mut views: Vec<Option<TensorView>> = vec![None; n_in];
        for (i, t) in &f {
            views[*i] = Some(t.view());
        }
        if in_arena {
            model.run_cached(&views, &mut cache).unwrap();
        } else {
            let meta = model.meta();
            let all: Vec<TensorView> = (0..n_in)
                .map(|i| {
                    views[i].unwrap_or_else(|| past[meta.kv_cache.iter().position(|s| s.input == i).unwrap()].view())
                })
                .collect();
            let mut outs = model.run(&all).unwrap();
            past = meta
                .kv_cache
                .iter()
                .map(|s| std::mem::replace(&mut outs[s.output], Tensor::zeros(DType::F32, vec![0]).unwrap()))
                .collect();
        }
    };
    step(&ids, len);
    len += prompt;
    let t = Instant::now();
    for k in 0..tokens {
        step(&[(7 + k) as i64], len);
        len += 1;
    }
    t.elapsed().as_secs_f64() / tokens as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).expect("usage: kv_decode MODEL.edgec [PROMPTS] [TOKENS] [REPEAT]");
    let prompts: Vec<usize> =
        args.get(2).map_or("16,256,768", String::as_str).split(',').map(|p| p.parse().unwrap()).collect();
    let tokens: usize = args.get(3).map_or(32, |t| t.parse().unwrap());
    let repeat: usize = args.get(4).map_or(3, |t| t.parse().unwrap());
    let model = Model::load(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let spec = LmSpec::detect(&model).unwrap();
    println!("| prompt | ms/token, cache copied in+out (run) | ms/token, cache in arena (run_cached) | speed-up |");
    println!("|--:|--:|--:|--:|");
    for &p in &prompts {
        let (mut copied, mut arena) = (Vec::new(), Vec::new());
        for _ in 0..repeat {
            copied.push(decode(&model, &spec, p, tokens, false));
            arena.push(decode(&model, &spec, p, tokens, true));
        }
        let (c, a) = (median(copied) * 1e3, median(arena) * 1e3);
        println!("| {p} | {c:.2} | {a:.2} | {:.2}x |", c / a);
    }
    println!(
        "\n{} threads, {tokens} decode steps after each prompt, median of {repeat}, alternating.",
        model.threads()
    );
}

//! Text generation with a compiled causal language model: prefill, then token-by-token decode
//! with the KV cache, greedy or sampled (temperature, top-k, top-p, repetition penalty, seed),
//! stop tokens and a streaming callback. Sampling is the only math here; the model runs in the
//! generated code.
//!
//! Two graph shapes are understood, by their input/output names (as Optimum exports Llama):
//! a decoder with past (`input_ids`, optional `attention_mask`/`position_ids`,
//! `past_key_values.N.key/value` → `logits`, `present.N.key/value`), which decodes one token per
//! step, and a plain full-sequence graph, which is re-run over the whole text each step.

use std::time::Instant;

use crate::tensor::{Tensor, TensorView};
use crate::{DType, KvCache, Model, RunError};

/// Where the model's language-model inputs and outputs are (indices into META).
#[derive(Clone, Debug)]
pub struct LmSpec {
    pub input_ids: usize,
    pub attention_mask: Option<usize>,
    pub position_ids: Option<usize>,
    /// Per layer: (past key input, past value input, present key output, present value output).
    pub cache: Vec<(usize, usize, usize, usize)>,
    pub logits: usize,
    /// The artifact computes logits for the last position only (`edgec compile --logits last`:
    /// `logits` is declared [batch, 1, vocab] while `input_ids` takes any number of positions).
    pub last_position_only: bool,
}

impl LmSpec {
    pub fn detect(model: &Model) -> Result<LmSpec, String> {
        let m = model.meta();
        let input = |n: &str| m.inputs.iter().position(|t| t.name == n);
        let output = |n: &str| m.outputs.iter().position(|t| t.name == n);
        let input_ids = input("input_ids").ok_or("the model has no `input_ids` input: not a causal LM")?;
        let logits = output("logits").ok_or("the model has no `logits` output: not a causal LM")?;
        let mut cache = Vec::new();
        for layer in 0.. {
            let k = input(&format!("past_key_values.{layer}.key"));
            let v = input(&format!("past_key_values.{layer}.value"));
            let (Some(k), Some(v)) = (k, v) else { break };
            let pk = output(&format!("present.{layer}.key")).ok_or(format!("no present.{layer}.key output"))?;
            let pv = output(&format!("present.{layer}.value")).ok_or(format!("no present.{layer}.value output"))?;
            cache.push((k, v, pk, pv));
        }
        let known = 1
            + cache.len() * 2
            + usize::from(input("attention_mask").is_some())
            + usize::from(input("position_ids").is_some());
        if known != m.inputs.len() {
            return Err(
                "the model has inputs besides input_ids, attention_mask, position_ids and past_key_values.*".into()
            );
        }
        if m.inputs[input_ids].dtype != DType::I64 || m.outputs[logits].dtype != DType::F32 {
            return Err("input_ids must be int64 and logits float32".into());
        }
        let fixed_one = |shape: &[crate::format::Dim]| shape.get(1).and_then(|d| d.as_constant()) == Some(1);
        let last_position_only = fixed_one(&m.outputs[logits].shape) && !fixed_one(&m.inputs[input_ids].shape);
        Ok(LmSpec {
            input_ids,
            attention_mask: input("attention_mask"),
            position_ids: input("position_ids"),
            cache,
            logits,
            last_position_only,
        })
    }
}

/// Sampling settings; the default is greedy.
#[derive(Clone, Debug)]
pub struct Sampling {
    /// 0 = greedy (argmax).
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0 = all).
    pub top_p: f32,
    /// > 1 lowers the logits of tokens already in the text (CTRL-style).
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: 0 }
    }
}

/// SplitMix64: small, seeded, reproducible on every platform.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Picks the next token from one position's logits.
pub fn sample(logits: &[f32], history: &[u32], s: &Sampling, rng: &mut Rng) -> u32 {
    let mut l: Vec<f32> = logits.to_vec();
    if s.repetition_penalty != 1.0 {
        for &t in history {
            if let Some(x) = l.get_mut(t as usize) {
                *x = if *x > 0.0 { *x / s.repetition_penalty } else { *x * s.repetition_penalty };
            }
        }
    }
    let argmax =
        |v: &[f32]| v.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0;
    if s.temperature <= 0.0 {
        return argmax(&l) as u32;
    }
    let mut idx: Vec<usize> = (0..l.len()).collect();
    idx.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
    if s.top_k > 0 {
        idx.truncate(s.top_k);
    }
    let max = l[idx[0]];
    let mut probs: Vec<f64> = idx.iter().map(|&i| (((l[i] - max) / s.temperature) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if s.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs.iter().position(|&p| {
            acc += p;
            acc >= s.top_p as f64
        });
        let keep = keep.map_or(probs.len(), |k| k + 1);
        probs.truncate(keep);
        idx.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let mut r = rng.next_f64();
    for (p, &i) in probs.iter().zip(&idx) {
        if r < *p {
            return i as u32;
        }
        r -= p;
    }
    idx[idx.len() - 1] as u32
}

/// Timing of one generation.
#[derive(Clone, Debug, Default)]
pub struct GenStats {
    pub prompt_tokens: usize,
    pub prompt_secs: f64,
    pub generated: usize,
    pub generate_secs: f64,
}

/// A conversation with a loaded model: the tokens so far and the KV cache.
pub struct Session<'m> {
    model: &'m Model,
    spec: LmSpec,
    tokens: Vec<u32>,
    /// Generated tokens not yet run through the model (the last one of a generation); the next
    /// `feed` runs them first.
    pending: Vec<u32>,
    /// Per cache input (in `spec.cache` order, key then value): the cache tensor, when the
    /// artifact does not keep its cache in the arena.
    cache: Vec<Tensor>,
    /// The cache in the model's arena (artifacts compiled with their KV cache there).
    kv: Option<KvCache>,
}

impl<'m> Session<'m> {
    pub fn new(model: &'m Model) -> Result<Session<'m>, String> {
        let spec = LmSpec::detect(model)?;
        // The arena cache serves when it covers every past input of the spec.
        let in_arena = |i: usize| model.meta().kv_cache.iter().any(|s| s.input == i);
        let kv = model.kv_cache().filter(|_| spec.cache.iter().all(|&(k, v, _, _)| in_arena(k) && in_arena(v)));
        let mut s = Session { model, spec, tokens: Vec::new(), pending: Vec::new(), cache: Vec::new(), kv };
        s.reset()?;
        Ok(s)
    }

    pub fn spec(&self) -> &LmSpec {
        &self.spec
    }

    /// Forgets the text and empties the cache.
    pub fn reset(&mut self) -> Result<(), String> {
        self.tokens.clear();
        self.pending.clear();
        self.cache.clear();
        if let Some(kv) = &mut self.kv {
            kv.clear();
            return Ok(());
        }
        for &(k, v, _, _) in &self.spec.cache {
            for i in [k, v] {
                self.cache.push(empty_past(self.model, i, 2)?);
            }
        }
        Ok(())
    }

    /// The text so far (prompt and generated tokens).
    pub fn tokens(&self) -> Vec<u32> {
        self.tokens.iter().chain(&self.pending).copied().collect()
    }

    /// Appends `ids` to the text and returns the logits after its last token. Works with artifacts
    /// that compute every position's logits and with `--logits last` ones.
    pub fn feed(&mut self, ids: &[u32]) -> Result<Vec<f32>, RunError> {
        Ok(self.feed_rows(ids, true)?.0)
    }

    /// Appends `ids` and returns the logits at every new position (`ids.len()` rows of `vocab`) and
    /// the vocabulary size. An artifact compiled with `--logits last` has only the last row: that
    /// is an error (`RunError::LogitsRows`) whenever more than one position is asked for, raised
    /// before the model runs.
    pub fn feed_all(&mut self, ids: &[u32]) -> Result<(Vec<f32>, usize), RunError> {
        let positions = self.pending.len() + ids.len();
        if self.spec.last_position_only && positions > 1 {
            return Err(RunError::LogitsRows { positions, rows: 1 });
        }
        let (all, vocab) = self.feed_rows(ids, false)?;
        let rows = all.len() / vocab.max(1);
        if rows < positions {
            return Err(RunError::LogitsRows { positions, rows });
        }
        Ok((all, vocab))
    }

    /// Appends `ids` and returns the logits of the new positions the artifact computes (all of
    /// them, or the last one; only the last with `last_only`, so generation does not copy a
    /// prompt's worth of rows) and the vocabulary size.
    fn feed_rows(&mut self, ids: &[u32], last_only: bool) -> Result<(Vec<f32>, usize), RunError> {
        let ids: Vec<u32> = std::mem::take(&mut self.pending).into_iter().chain(ids.iter().copied()).collect();
        let ids = &ids[..];
        if ids.is_empty() {
            // No position to return logits for (and a `--logits last` graph would slice row -1).
            let name = self.model.meta().inputs[self.spec.input_ids].name.clone();
            return Err(RunError::Dim { name, axis: 1, expected: "at least 1 token".into(), got: 0 });
        }
        let rows = if last_only { 1 } else { ids.len() };
        let with_cache = !self.spec.cache.is_empty();
        let past = if with_cache { self.tokens.len() } else { 0 };
        // Without a cache the whole text is the input.
        let new: Vec<i64> = if with_cache {
            ids.iter().map(|&t| t as i64).collect()
        } else {
            self.tokens.iter().chain(ids).map(|&t| t as i64).collect()
        };
        let total = past + new.len();
        let n = new.len();
        let input_ids = Tensor::from_slice(vec![1, n], &new)?;
        let mask = Tensor::from_slice(vec![1, total], &vec![1i64; total])?;
        let pos: Vec<i64> = (past..total).map(|p| p as i64).collect();
        let positions = Tensor::from_slice(vec![1, n], &pos)?;
        let m = self.model.meta();
        let mut views: Vec<Option<TensorView>> = vec![None; m.inputs.len()];
        views[self.spec.input_ids] = Some(input_ids.view());
        if let Some(i) = self.spec.attention_mask {
            views[i] = Some(mask.view());
        }
        if let Some(i) = self.spec.position_ids {
            views[i] = Some(positions.view());
        }
        if let Some(kv) = &mut self.kv {
            let outs = self.model.run_cached(&views, kv)?;
            self.tokens.extend_from_slice(ids);
            let logits = outs[self.spec.logits].as_ref().expect("logits are not a cache output");
            return Ok(last_rows(logits, rows));
        }
        for (l, &(k, v, _, _)) in self.spec.cache.iter().enumerate() {
            views[k] = Some(self.cache[2 * l].view());
            views[v] = Some(self.cache[2 * l + 1].view());
        }
        let views: Vec<TensorView> = views.into_iter().map(|v| v.expect("every input is set")).collect();
        let mut outs = self.model.run(&views)?;
        self.tokens.extend_from_slice(ids);
        // The presents become the next step's past.
        for (l, &(_, _, pk, pv)) in self.spec.cache.iter().enumerate() {
            self.cache[2 * l] = std::mem::replace(&mut outs[pk], Tensor::zeros(DType::F32, vec![0])?);
            self.cache[2 * l + 1] = std::mem::replace(&mut outs[pv], Tensor::zeros(DType::F32, vec![0])?);
        }
        Ok(last_rows(&outs[self.spec.logits], rows))
    }
    /// Mean negative log-likelihood (nats) of `ids[1..]` given the preceding tokens, as one
    /// prefill from an empty context; also returns the number of predicted tokens.
    pub fn nll(&mut self, ids: &[u32]) -> Result<(f64, usize), RunError> {
        self.reset().map_err(|e| RunError::OutputShape { name: "cache".into(), reason: e })?;
        let (all, vocab) = self.feed_all(ids)?;
        let mut total = 0.0;
        for (pos, &next) in ids.iter().enumerate().skip(1) {
            let row = &all[(pos - 1) * vocab..pos * vocab];
            total -= log_softmax_at(row, next as usize);
        }
        Ok((total, ids.len().saturating_sub(1)))
    }
}

/// An empty past for cache input `input` of a decoder with past: batch (axis 0) 1, length 0
/// along `axis`, every other dim as declared (which must be fixed).
pub fn empty_past(model: &Model, input: usize, axis: usize) -> Result<Tensor, String> {
    let m = &model.meta().inputs[input];
    let dims: Result<Vec<usize>, String> = m
        .shape
        .iter()
        .enumerate()
        .map(|(a, d)| match d.as_constant() {
            _ if a == axis => Ok(0),
            Some(c) => Ok(c as usize),
            None if a == 0 => Ok(1),
            None => Err(format!("input `{}`: dim {a} must be fixed", m.name)),
        })
        .collect();
    Tensor::zeros(DType::F32, dims?).map_err(|e| e.to_string())
}

/// The logits of the last `n` positions (fewer if the output has fewer rows), and the vocabulary size.
fn last_rows(logits: &Tensor, n: usize) -> (Vec<f32>, usize) {
    let vocab = *logits.shape().last().unwrap_or(&0);
    let all = logits.as_slice::<f32>().unwrap_or(&[]);
    (all[all.len() - vocab * n.min(all.len() / vocab.max(1))..].to_vec(), vocab)
}

/// log(softmax(row)[i]) in f64.
pub fn log_softmax_at(row: &[f32], i: usize) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    row[i] as f64 - max - sum.ln()
}

impl Session<'_> {
    /// Feeds the prompt, then samples up to `max_new` tokens, calling `on_token` for each (return
    /// false to stop); stops early at any of `stop`.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_new: usize,
        stop: &[u32],
        sampling: &Sampling,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<GenStats, RunError> {
        let mut rng = Rng::new(sampling.seed);
        let t0 = Instant::now();
        let mut logits = self.feed(prompt)?;
        let mut stats =
            GenStats { prompt_tokens: prompt.len(), prompt_secs: t0.elapsed().as_secs_f64(), ..Default::default() };
        let t1 = Instant::now();
        for step in 0..max_new {
            let next = sample(&logits, &self.tokens, sampling, &mut rng);
            if stop.contains(&next) {
                break;
            }
            stats.generated += 1;
            if !on_token(next) || step + 1 == max_new {
                // Not run yet: a later feed starts with it.
                self.pending.push(next);
                break;
            }
            logits = self.feed(&[next])?;
        }
        stats.generate_secs = t1.elapsed().as_secs_f64();
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax_and_penalty_moves_it() {
        let l = [0.1, 3.0, 2.9, -1.0];
        let mut rng = Rng::new(1);
        assert_eq!(sample(&l, &[], &Sampling::default(), &mut rng), 1);
        let s = Sampling { repetition_penalty: 1.2, ..Default::default() };
        assert_eq!(sample(&l, &[1], &s, &mut rng), 2);
    }

    #[test]
    fn sampling_follows_the_distribution_and_is_reproducible() {
        let l = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY];
        let s = Sampling { temperature: 1.0, seed: 7, ..Default::default() };
        let mut rng = Rng::new(s.seed);
        let draws: Vec<u32> = (0..4000).map(|_| sample(&l, &[], &s, &mut rng)).collect();
        let ones = draws.iter().filter(|&&t| t == 1).count() as f64 / draws.len() as f64;
        assert!((ones - 0.75).abs() < 0.03, "{ones}");
        assert!(!draws.contains(&2));
        let mut again = Rng::new(s.seed);
        let first: Vec<u32> = (0..20).map(|_| sample(&l, &[], &s, &mut again)).collect();
        assert_eq!(first, draws[..20]);
        // top-k 1 and a tiny top-p are both greedy.
        for s in [Sampling { top_k: 1, ..s.clone() }, Sampling { top_p: 0.1, ..s.clone() }] {
            assert!((0..100).all(|_| sample(&l, &[], &s, &mut rng) == 1));
        }
    }
}

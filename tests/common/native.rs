//! Helpers to compile a graph and run it natively (this machine) or as a qemu job (cross targets).

use super::qemu::Job;
use edgec::codegen::{compile, run_model, Compiled, Options};
use edgec::ir::{Graph, Tensor};

/// Bounds generous enough for every test graph's symbolic dims.
pub fn test_options(target: &str) -> Options {
    Options { target: target.into(), max_seq: Some(256), max_batch: Some(8), ..Default::default() }
}

pub fn input_names(g: &Graph) -> Vec<String> {
    g.inputs.iter().map(|&n| g.g[n].outputs[0].name.clone()).collect()
}

/// Compiles for `target` and runs on this machine.
pub fn run_native(g: &Graph, inputs: &[Tensor], target: &str) -> Result<(Compiled, Vec<Tensor>), String> {
    let c = compile(g, &test_options(target)).map_err(|e| format!("compile: {e}"))?;
    let bytes = c.artifact().map_err(|e| e.to_string())?;
    let model = edgec_runtime::Model::from_bytes(&bytes).map_err(|e| format!("load: {e}"))?;
    let feeds: Vec<(String, Tensor)> = input_names(g).into_iter().zip(inputs.iter().cloned()).collect();
    let outs = run_model(&model, &feeds).map_err(|e| format!("run: {e}"))?;
    Ok((c, outs.into_iter().map(|(_, t)| t).collect()))
}

/// A qemu job for `g` compiled for `target`; the outputs are expected to have `want`'s shapes.
pub fn cross_job(name: &str, g: &Graph, inputs: &[Tensor], want: &[Tensor], target: &str) -> Result<Job, String> {
    cross_job_with(name, g, inputs, want, &test_options(target))
}

pub fn cross_job_with(
    name: &str,
    g: &Graph,
    inputs: &[Tensor],
    want: &[Tensor],
    opts: &Options,
) -> Result<Job, String> {
    let c = compile(g, opts).map_err(|e| format!("compile for {}: {e}", opts.target))?;
    let mut symbols = vec![0i64; c.meta.symbols.len()];
    for (m, t) in c.meta.inputs.iter().zip(inputs) {
        for (d, &size) in m.shape.iter().zip(&t.shape) {
            if let Some(s) = d.as_symbol() {
                symbols[c.meta.symbol_index(s).unwrap()] = size as i64;
            }
        }
    }
    Ok(Job {
        name: name.to_string(),
        artifact: c.artifact().map_err(|e| e.to_string())?,
        symbols,
        inputs: inputs.iter().map(|t| t.to_le_bytes()).collect(),
        output_sizes: want.iter().map(|t| t.len() * t.dtype().size()).collect(),
        parallel_chunk: None,
    })
}

/// Decodes a job's raw outputs with the expected tensors' dtypes and shapes.
pub fn decode_outputs(raw: &[Vec<u8>], want: &[Tensor]) -> Result<Vec<Tensor>, String> {
    raw.iter().zip(want).map(|(b, w)| Tensor::from_le_bytes(w.dtype(), w.shape.clone(), b)).collect()
}

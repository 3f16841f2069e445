//! `logits-last` (`edgec compile --logits last`): a causal LM's graph computes `logits`
//! [batch, seq, vocab] for every position of the prompt, but generation reads only the last row.
//! This pass finds the projection that produces the graph output `logits` (the lm_head: MatMul,
//! MatMulNBits, MatMulInteger or a fused MatMulAct, possibly followed by position-wise ops such as
//! a bias, a Cast or a soft-capping tanh) and slices its activation input [batch, seq, hidden] to
//! the last position along axis 1, `Slice(x, starts=[-1], ends=[INT64_MAX], axes=[1])`, so the
//! projection and everything after it run on one row and `logits` becomes [batch, 1, vocab]. On
//! SmolLM2-135M the lm_head is 16 % of prefill time. A Slice with a constant negative start on a
//! symbolic axis is an offset view (`seq - 1` rows in) for codegen's map kernel and plain ONNX for
//! the interpreter. Graphs whose lm_head reads a rank-2 input (a Gemm after a Reshape to
//! [batch*seq, hidden]) are refused with an error naming the node.
//!
//! Not in the default pipeline: perplexity (`edgec eval`) needs every position. `edgec compile`
//! runs it last, after `--quantize` and the matmul fusions (`AFTER_QUANTIZE` in passes/mod.rs),
//! because the calibration run behind `--method gptq`, `--auto-keep` and `--act-static` must see
//! the lm_head's input at every position: with the slice in place, the lm_head's Gram matrix and
//! activation statistics would come from one row per calibration sequence. The slice then sits
//! between whatever the fusions made of the final norm and the (quantized, fused) projection.
//! Slicing there gives the same last row as the full computation: every op from the slice to
//! `logits` is position-wise (int8 activations are rounded per row, or with one static scale).

use super::shape_infer::infer_shapes;
use super::{Pass, PassStats};
use crate::error::{Error, Result};
use crate::ir::text::shape_str;
use crate::ir::{Dim, Graph, Op, Tensor, Value, ValueRef};

pub struct LogitsLast;

/// The name of the graph output this pass cuts down (Optimum's and torch.onnx's causal-LM exports).
pub const LOGITS: &str = "logits";

fn err(msg: impl std::fmt::Display) -> Error {
    Error::invalid(format!("--logits last: {msg}"))
}

/// Whether an input of shape `s` to a node with a rank-3 output broadcasts along the output's
/// sequence axis 1 (its dim there is 1, or it has no such axis).
fn seq_free(s: Option<&[Dim]>) -> bool {
    match s {
        Some(s) if s.len() >= 2 => s[s.len() - 2] == Dim::fixed(1),
        Some(_) => true,
        None => false,
    }
}

/// The input of a position-wise op that carries the positions to its output `v` (rank 3): the
/// one input whose shape is the output's, every other input broadcast along the sequence axis.
/// `None` for ops that mix positions (Reshape, Transpose, reductions, ...).
fn position_wise_source(g: &Graph, v: ValueRef) -> Option<ValueRef> {
    let node = g.node(v.node);
    let last_axis = |axis: i64| axis == -1 || axis == 2;
    let ok = match &node.op {
        Op::Identity | Op::Cast { .. } | Op::Unary(_) | Op::Binary(_) | Op::Clip | Op::Elementwise { .. } => true,
        Op::Dropout => v.slot == 0,
        Op::Softmax { axis } | Op::LogSoftmax { axis } => last_axis(*axis),
        _ => false,
    };
    if !ok {
        return None;
    }
    let out = g.ty(v).shape.as_deref()?;
    let ins: Vec<ValueRef> = g.inputs_of(v.node).into_iter().flatten().collect();
    let mut carriers = ins.iter().filter(|&&x| g.ty(x).shape.as_deref() == Some(out));
    let src = *carriers.next()?;
    if carriers.next().is_some() || !ins.iter().filter(|&&x| x != src).all(|&x| seq_free(g.ty(x).shape.as_deref())) {
        return None;
    }
    Some(src)
}

/// Whether `v` is read only by `reader` (one input slot) or, for the logits value itself, only as
/// the graph output `logits`; the node's other outputs must be unread.
fn only_on_path(g: &Graph, v: ValueRef, reader: Option<petgraph::stable_graph::NodeIndex>) -> bool {
    let users = g.users_of(v);
    let outputs = g.outputs.iter().filter(|o| o.value == v).count();
    let path_ok = match reader {
        Some(r) => users.len() == 1 && users[0].0 == r && outputs == 0,
        None => users.is_empty() && outputs == 1,
    };
    let others_unread = (0..g.node(v.node).outputs.len()).filter(|&s| s != v.slot).all(|s| {
        let o = ValueRef { node: v.node, slot: s };
        g.users_of(o).is_empty() && !g.outputs.iter().any(|go| go.value == o)
    });
    path_ok && others_unread
}

impl Pass for LogitsLast {
    fn name(&self) -> &'static str {
        "logits-last"
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats> {
        let Some(out) = g.outputs.iter().find(|o| o.name == LOGITS) else {
            let names: Vec<&str> = g.outputs.iter().map(|o| o.name.as_str()).collect();
            return Err(err(format!(
                "the graph has no output named `{LOGITS}` (its outputs: {}); the option is for causal language models",
                names.join(", ")
            )));
        };
        let logits = out.value;
        let before = g.ty(logits).shape.clone();
        match before.as_deref() {
            Some([_, s, _]) if *s == Dim::fixed(1) => return Ok(PassStats::default()), // one row already
            Some([_, _, _]) => {}
            _ => {
                return Err(err(format!(
                    "`{LOGITS}` has shape {}, expected [batch, sequence, vocab]",
                    shape_str(&before)
                )))
            }
        }
        // Walk back through position-wise ops to the projection.
        let mut v = logits;
        let mut reader = None;
        let proj = loop {
            if !only_on_path(g, v, reader) {
                return Err(err(format!(
                    "`{}` (on the way from `{LOGITS}` to its projection) has other readers",
                    g.value(v).name
                )));
            }
            let node = g.node(v.node);
            match node.op {
                Op::MatMul | Op::Gemm { .. } | Op::MatMulNBits { .. } | Op::MatMulAct { .. } | Op::MatMulInteger
                    if v.slot == 0 =>
                {
                    break v.node
                }
                _ => {}
            }
            match position_wise_source(g, v) {
                Some(src) => {
                    reader = Some(v.node);
                    v = src;
                }
                None => {
                    return Err(err(format!(
                        "cannot find the projection that computes `{LOGITS}`: `{}` is produced by {} `{}`, \
                         which is neither a matmul nor position-wise",
                        g.value(v).name,
                        node.op.name(),
                        node.name
                    )))
                }
            }
        };
        let pname = g.node(proj).name.clone();
        let a = g.inputs_of(proj)[0].ok_or_else(|| err(format!("the projection `{pname}` has no input A")))?;
        let a_ty = g.ty(a).clone();
        let dims = match a_ty.shape.as_deref() {
            Some(d @ [_, _, _]) => d.to_vec(),
            _ => {
                return Err(err(format!(
                    "the projection `{pname}` ({}) reads `{}` of shape {}; slicing the last position needs \
                     [batch, sequence, hidden]",
                    g.node(proj).op.name(),
                    g.value(a).name,
                    shape_str(&a_ty.shape)
                )))
            }
        };
        if dims[1] == Dim::fixed(1) {
            return Ok(PassStats::default());
        }
        let base = format!("{pname}/logits_last");
        let i64s = |g: &mut Graph, what: &str, v: i64| {
            g.add_const(format!("{base}/{what}"), &Tensor::from_vec(vec![1], vec![v]))
        };
        let starts = i64s(g, "starts", -1);
        let ends = i64s(g, "ends", i64::MAX);
        let axes = i64s(g, "axes", 1);
        let sliced_ty = crate::ir::TensorType::new(a_ty.dtype, vec![dims[0].clone(), Dim::fixed(1), dims[2].clone()]);
        let slice = g.add_node(
            Op::Slice,
            format!("{base}/Slice"),
            &[Some(a), Some(starts), Some(ends), Some(axes)],
            vec![Value { name: format!("{base}/Slice_output_0"), ty: sliced_ty }],
        );
        g.set_input(proj, 0, ValueRef { node: slice, slot: 0 });
        infer_shapes(g)?;
        let after = g.ty(logits).shape.clone();
        let want = before.map(|b| vec![b[0].clone(), Dim::fixed(1), b[2].clone()]);
        if after != want {
            return Err(err(format!(
                "after slicing the input of `{pname}`, `{LOGITS}` has shape {} instead of {}",
                shape_str(&after),
                shape_str(&want)
            )));
        }
        Ok(PassStats { changed: 1 })
    }
}

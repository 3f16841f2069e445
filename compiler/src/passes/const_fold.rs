//! Constant folding: a node whose inputs are all constants is evaluated once at
//! compile time with the reference interpreter's `eval_op`; a node whose result
//! shape inference already knows exactly (Shape of a static tensor, shape
//! arithmetic on fixed dims) becomes that constant. Results that would be much
//! larger than their inputs (ConstantOfShape, Expand, DequantizeLinear of int8
//! weights) stay as ops: folding them would only grow the model.

use super::shape_infer;
use super::{Pass, PassStats};
use crate::error::{Error, Result};
use crate::interp::eval_op;
use crate::ir::{Graph, Op, Tensor, ValueRef};

pub struct ConstFold;

/// A fold may produce up to this many bytes beyond the size of its inputs.
const GROWTH_ALLOWANCE: usize = 64 * 1024;

impl Pass for ConstFold {
    fn name(&self) -> &'static str {
        "const-fold"
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats> {
        let known = shape_infer::infer(g)?;
        let order = g.topo_order().map_err(Error::Invalid)?;
        let mut changed = 0;
        for n in order {
            let node = &g.g[n];
            if matches!(node.op, Op::Input { .. } | Op::Const { .. }) {
                continue;
            }
            let inputs = g.inputs_of(n);
            let all_const = inputs.iter().flatten().all(|v| g.const_of(*v).is_some());
            let results: Option<Vec<Tensor>> = if all_const {
                let tensors: Vec<Option<Tensor>> =
                    inputs.iter().map(|v| v.and_then(|v| g.const_of(v)).map(|c| c.to_tensor())).collect();
                let args: Vec<Option<&Tensor>> = tensors.iter().map(|t| t.as_ref()).collect();
                let in_bytes: usize = tensors.iter().flatten().map(|t| t.len() * t.dtype().size()).sum();
                match eval_op(&node.op, &args, node.outputs.len()) {
                    Ok(outs) => {
                        let out_bytes: usize = outs.iter().map(|t| t.len() * t.dtype().size()).sum();
                        (out_bytes <= in_bytes + GROWTH_ALLOWANCE).then_some(outs)
                    }
                    // A constant subgraph that cannot be evaluated fails the same way at run time.
                    Err(msg) => {
                        return Err(Error::Node {
                            node: node.name.clone(),
                            op: node.op.name().into(),
                            opset: g.opset,
                            msg,
                        })
                    }
                }
            } else {
                known_values(g, &known, n)
            };
            let Some(results) = results else { continue };
            for (slot, t) in results.iter().enumerate().take(g.g[n].outputs.len()) {
                let name = g.g[n].outputs[slot].name.clone();
                let c = g.add_const(name, t);
                g.replace_uses(ValueRef { node: n, slot }, c);
            }
            g.g.remove_node(n);
            changed += 1;
        }
        Ok(PassStats { changed })
    }
}

/// The node's outputs as tensors, when shape inference tracked every one of them
/// as fully fixed integer values.
fn known_values(g: &Graph, known: &shape_infer::Inferred, n: petgraph::stable_graph::NodeIndex) -> Option<Vec<Tensor>> {
    let node = &g.g[n];
    node.outputs
        .iter()
        .enumerate()
        .map(|(slot, out)| {
            let dims = known.values.get(&ValueRef { node: n, slot })?;
            let shape = out.ty.fixed_shape()?;
            let vals: Vec<i64> = dims.iter().map(|d| d.as_fixed()).collect::<Option<_>>()?;
            if shape.iter().product::<usize>() != vals.len() || !out.ty.dtype.is_int() {
                return None;
            }
            Some(Tensor::from_vec(shape, vals).cast(out.ty.dtype))
        })
        .collect()
}

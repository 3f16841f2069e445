//! The reference interpreter: plain evaluation of every IR op, the oracle that
//! passes and generated code are checked against.
//!
//! `eval_op` computes one op on concrete tensors (constant folding uses it too);
//! `Interpreter` runs a whole graph, validates the feeds against the declared
//! input types, and checks every computed value against the type shape inference
//! gave it, so a wrong inferred shape is caught the first time it is run.

pub mod attention;
mod broadcast;
pub mod elementwise;
mod gather;
pub mod linalg;
pub mod math;
pub mod normalize;
mod quant;
mod reduce;
pub mod shape_ops;

use crate::error::{Error, Result};
use crate::ir::{Dim, Graph, Op, Tensor, TensorType, ValueRef};
use petgraph::stable_graph::NodeIndex;
use std::collections::HashMap;
use std::sync::OnceLock;

/// Evaluates one op. `inputs` has one entry per input slot (`None` = omitted
/// optional input); `n_outputs` is how many outputs the node declares.
pub fn eval_op(op: &Op, inputs: &[Option<&Tensor>], n_outputs: usize) -> Result<Vec<Tensor>, String> {
    let arg = |i: usize| -> Result<&Tensor, String> {
        inputs.get(i).copied().flatten().ok_or_else(|| format!("input {i} is missing"))
    };
    let opt = |i: usize| inputs.get(i).copied().flatten();
    let one = |t: Tensor| Ok(vec![t]);
    match op {
        Op::Input { .. } | Op::Const { .. } => Err("inputs and constants are not evaluated".into()),
        Op::Unary(u) => one(elementwise::unary(u, arg(0)?)?),
        Op::Binary(b) => one(elementwise::binary(*b, arg(0)?, arg(1)?)?),
        Op::Variadic(v) => {
            let xs: Vec<&Tensor> = inputs.iter().map(|x| x.ok_or("missing input")).collect::<Result<_, _>>()?;
            one(elementwise::variadic(*v, &xs)?)
        }
        Op::Where => one(elementwise::where_(arg(0)?, arg(1)?, arg(2)?)?),
        Op::Clip => one(elementwise::clip(arg(0)?, opt(1), opt(2))?),
        Op::Cast { to } => one(arg(0)?.cast(*to)),
        Op::CastLike => one(arg(0)?.cast(arg(1)?.dtype())),
        Op::Identity => one(arg(0)?.clone()),
        Op::Dropout => {
            if let Some(t) = opt(2) {
                if t.to_f64_vec().first().is_some_and(|&v| v != 0.0) {
                    return Err("Dropout in training mode is not supported (inference only)".into());
                }
            }
            let x = arg(0)?.clone();
            let mask = Tensor::from_vec(x.shape.clone(), vec![true; x.len()]);
            Ok(if n_outputs > 1 { vec![x, mask] } else { vec![x] })
        }
        Op::MatMul => one(linalg::matmul(arg(0)?, arg(1)?)?),
        Op::MatMulInteger => one(linalg::matmul_integer(arg(0)?, arg(1)?, opt(2), opt(3))?),
        Op::Gemm { alpha, beta, trans_a, trans_b } => {
            one(linalg::gemm(arg(0)?, arg(1)?, opt(2), *alpha, *beta, *trans_a, *trans_b)?)
        }
        Op::Softmax { axis } => one(normalize::softmax(arg(0)?, *axis, false)?),
        Op::LogSoftmax { axis } => one(normalize::softmax(arg(0)?, *axis, true)?),
        Op::LayerNorm { axis, epsilon } => {
            let mut outs = normalize::layer_norm(arg(0)?, arg(1)?, opt(2), *axis, *epsilon)?;
            outs.truncate(n_outputs);
            Ok(outs)
        }
        Op::Reduce { kind, axes, keepdims, noop_with_empty_axes } => {
            let from_input = opt(1).map(|t| t.to_i64_vec()).transpose()?;
            let axes = from_input.as_deref().or(axes.as_deref());
            one(reduce::reduce(*kind, arg(0)?, axes, *keepdims, *noop_with_empty_axes)?)
        }
        Op::ArgReduce { max, axis, keepdims, select_last_index } => {
            one(reduce::arg_reduce(arg(0)?, *max, *axis, *keepdims, *select_last_index)?)
        }
        Op::CumSum { exclusive, reverse } => one(reduce::cumsum(arg(0)?, arg(1)?, *exclusive, *reverse)?),
        Op::Transpose { perm } => one(shape_ops::transpose(arg(0)?, perm.as_deref())?),
        Op::Reshape { allowzero } => one(shape_ops::reshape(arg(0)?, arg(1)?, *allowzero)?),
        Op::Flatten { axis } => one(shape_ops::flatten(arg(0)?, *axis)?),
        Op::Squeeze => one(shape_ops::squeeze(arg(0)?, opt(1))?),
        Op::Unsqueeze => one(shape_ops::unsqueeze(arg(0)?, arg(1)?)?),
        Op::Concat { axis } => {
            let xs: Vec<&Tensor> = inputs.iter().map(|x| x.ok_or("missing input")).collect::<Result<_, _>>()?;
            one(shape_ops::concat(&xs, *axis)?)
        }
        Op::Split { axis, num_outputs } => {
            if let Some(n) = num_outputs {
                if *n as usize != n_outputs {
                    return Err(format!("num_outputs={n} but the node has {n_outputs} outputs"));
                }
            }
            shape_ops::split(arg(0)?, *axis, opt(1), n_outputs)
        }
        Op::Slice => one(shape_ops::slice(arg(0)?, arg(1)?, arg(2)?, opt(3), opt(4))?),
        Op::Expand => one(shape_ops::expand(arg(0)?, arg(1)?)?),
        Op::Tile => one(shape_ops::tile(arg(0)?, arg(1)?)?),
        Op::Shape { start, end } => one(shape_ops::shape(arg(0)?, *start, *end)),
        Op::Size => one(Tensor::scalar(arg(0)?.len() as i64)),
        Op::ConstantOfShape { value } => one(shape_ops::constant_of_shape(arg(0)?, value)?),
        Op::Range => one(shape_ops::range(arg(0)?, arg(1)?, arg(2)?)?),
        Op::Gather { axis } => one(gather::gather(arg(0)?, arg(1)?, *axis)?),
        Op::GatherElements { axis } => one(gather::gather_elements(arg(0)?, arg(1)?, *axis)?),
        Op::GatherND { batch_dims } => one(gather::gather_nd(arg(0)?, arg(1)?, *batch_dims)?),
        Op::Trilu { upper } => one(shape_ops::trilu(arg(0)?, opt(1), *upper)?),
        Op::QuantizeLinear { axis, block_size, output_dtype, .. } => {
            one(quant::quantize_linear(arg(0)?, arg(1)?, opt(2), *axis, *block_size, *output_dtype)?)
        }
        Op::DequantizeLinear { axis, block_size } => {
            one(quant::dequantize_linear(arg(0)?, arg(1)?, opt(2), *axis, *block_size)?)
        }
        Op::DynamicQuantizeLinear => quant::dynamic_quantize_linear(arg(0)?),
        Op::RmsNorm { axis, epsilon } => one(normalize::rms_norm(arg(0)?, arg(1)?, *axis, *epsilon)?),
        Op::Attention { scale } => one(attention::attention(arg(0)?, arg(1)?, arg(2)?, opt(3), *scale)?),
        Op::MatMulNBits { .. } => {
            let (q, _) = op.nbits().expect("MatMulNBits has nbits attributes");
            one(matmul_nbits(&q, arg(0)?, arg(1)?, arg(2)?, opt(3))?)
        }
        Op::Elementwise { steps } => {
            let mut vals: Vec<Tensor> = Vec::with_capacity(steps.len());
            for st in steps {
                let get = |a: &crate::ir::ElemArg, vals: &[Tensor]| -> Result<Tensor, String> {
                    match *a {
                        crate::ir::ElemArg::In(i) => Ok(arg(i)?.clone()),
                        crate::ir::ElemArg::Step(j) => vals.get(j).cloned().ok_or_else(|| "bad step".into()),
                    }
                };
                let r = match (&st.op, &st.args[..]) {
                    (Op::Unary(u), [x]) => elementwise::unary(u, &get(x, &vals)?)?,
                    (Op::Binary(b), [x, y]) => elementwise::binary(*b, &get(x, &vals)?, &get(y, &vals)?)?,
                    (o, _) => return Err(format!("Elementwise step {} is not unary or binary", o.name())),
                };
                vals.push(r);
            }
            one(vals.pop().ok_or("Elementwise with no steps")?)
        }
        Op::MatMulAct { act, glu, nbits } => {
            let y = match nbits {
                Some(q) => matmul_nbits(q, arg(0)?, arg(1)?, arg(2)?, opt(3))?,
                None => linalg::matmul(arg(0)?, arg(1)?)?,
            };
            let bias = opt(op.matmul_act_bias_slot().unwrap());
            one(linalg::matmul_epilogue(&y, bias, *act, *glu)?)
        }
    }
}

/// MatMulNBits (plain or fused): A rounded as the kernels round it (static scale, or int8 per
/// row and block with accuracy level 4), times the dequantized weight.
fn matmul_nbits(
    q: &crate::ir::NBitsAttrs,
    a: &Tensor,
    b: &Tensor,
    scales: &Tensor,
    zero_points: Option<&Tensor>,
) -> Result<Tensor, String> {
    let w = quant::dequantize_nbits(b, scales, zero_points, q.k, q.n, q.bits, q.block_size)?;
    let a = match &q.act {
        Some(s) => quant::round_static(a, s)?,
        None if q.accuracy_level == 4 => quant::round_rows_to_int8(a, q.block_size)?,
        None => a.clone(),
    };
    linalg::matmul(&a, &Tensor::from_vec(vec![q.k, q.n], w))
}

/// Runs a graph on concrete inputs.
pub struct Interpreter<'g> {
    g: &'g Graph,
    order: Vec<NodeIndex>,
    /// Input slots of each node in `order`.
    wiring: Vec<Vec<Option<ValueRef>>>,
    /// How many times each value is read (by nodes and graph outputs).
    reads: HashMap<ValueRef, usize>,
    consts: Vec<OnceLock<Tensor>>,
}

/// A node hook for `Interpreter::run_hooked`: sees each op node's inputs, may replace one.
pub type Hook<'a> = dyn FnMut(NodeIndex, &[Option<&Tensor>]) -> Result<Option<(usize, Tensor)>, String> + 'a;

/// Symbol values bound from the feeds (and from unknown dims as they are met).
type Bindings = HashMap<String, i64>;

/// Checks a concrete shape against a declared type, binding symbols on first use.
fn check_type(ty: &TensorType, t: &Tensor, bind: &mut Bindings) -> Result<(), String> {
    if t.dtype() != ty.dtype {
        return Err(format!("has type {} but {} was expected", t.dtype(), ty.dtype));
    }
    let Some(dims) = &ty.shape else { return Ok(()) };
    if dims.len() != t.rank() {
        return Err(format!("has shape {:?} but rank {} was expected", t.shape, dims.len()));
    }
    for (i, (d, &actual)) in dims.iter().zip(&t.shape).enumerate() {
        let actual = actual as i64;
        // A lone symbol binds; anything else must evaluate to the actual size.
        let syms: Vec<&str> = d.symbols().collect();
        if syms.len() == 1 && *d == Dim::sym(syms[0]) && !bind.contains_key(syms[0]) {
            bind.insert(syms[0].to_string(), actual);
            continue;
        }
        match d.eval(&|s| bind.get(s).copied()) {
            Some(v) if v == actual => {}
            Some(v) => {
                return Err(format!("has shape {:?}, but dimension {i} should be {d} = {v}", t.shape));
            }
            None => {} // depends on a symbol not bound yet (data-dependent): accept
        }
    }
    Ok(())
}

impl<'g> Interpreter<'g> {
    pub fn new(g: &'g Graph) -> Result<Interpreter<'g>> {
        let order = g.topo_order().map_err(Error::Invalid)?;
        let wiring: Vec<_> = order.iter().map(|&n| g.inputs_of(n)).collect();
        let mut reads: HashMap<ValueRef, usize> = HashMap::new();
        for w in &wiring {
            for v in w.iter().flatten() {
                *reads.entry(*v).or_default() += 1;
            }
        }
        for o in &g.outputs {
            *reads.entry(o.value).or_default() += 1;
        }
        let consts = (0..g.consts.len()).map(|_| OnceLock::new()).collect();
        Ok(Interpreter { g, order, wiring, reads, consts })
    }

    /// Runs the graph; returns the outputs in graph-output order.
    pub fn run(&self, feeds: &[(String, Tensor)]) -> Result<Vec<(String, Tensor)>> {
        self.run_hooked(feeds, &mut |_, _| Ok(None))
    }

    /// Runs the graph and shows `observe` every op node (not inputs or constants) with its
    /// input tensors just before it is evaluated (calibration collects activation statistics so).
    pub fn run_observed(
        &self,
        feeds: &[(String, Tensor)],
        observe: &mut dyn FnMut(NodeIndex, &[Option<&Tensor>]),
    ) -> Result<Vec<(String, Tensor)>> {
        self.run_hooked(feeds, &mut |n, args| {
            observe(n, args);
            Ok(None)
        })
    }

    /// Like `run_observed`, but the hook may substitute one input of the node: `Some((slot, t))`
    /// evaluates the node with `t` in input `slot` (sequential pruning swaps in a layer's pruned
    /// weight, so later layers see the pruned model's activations). An `Err` stops the run.
    pub fn run_hooked(&self, feeds: &[(String, Tensor)], hook: &mut Hook) -> Result<Vec<(String, Tensor)>> {
        let g = self.g;
        let mut bind = Bindings::new();
        let mut by_name: HashMap<&str, &Tensor> = HashMap::new();
        for (name, t) in feeds {
            let known = g.inputs.iter().any(|&n| g.g[n].outputs[0].name == *name);
            if !known {
                let names: Vec<&str> = g.inputs.iter().map(|&n| g.g[n].outputs[0].name.as_str()).collect();
                return Err(Error::invalid(format!(
                    "'{name}' is not an input of the model (inputs: {})",
                    names.join(", ")
                )));
            }
            by_name.insert(name, t);
        }
        let mut values: HashMap<ValueRef, Tensor> = HashMap::new();
        let mut remaining = self.reads.clone();
        let mut outputs: HashMap<ValueRef, Tensor> = HashMap::new();
        for (&n, wiring) in self.order.iter().zip(&self.wiring) {
            let node = &g.g[n];
            let node_err =
                |msg: String| Error::Node { node: node.name.clone(), op: node.op.name().into(), opset: g.opset, msg };
            let results: Vec<Tensor> = match &node.op {
                Op::Input { .. } => {
                    let name = &node.outputs[0].name;
                    let t = by_name
                        .get(name.as_str())
                        .ok_or_else(|| Error::invalid(format!("input '{name}' was not given")))?;
                    check_type(&node.outputs[0].ty, t, &mut bind)
                        .map_err(|e| Error::invalid(format!("input '{name}' {e}")))?;
                    vec![(*t).clone()]
                }
                Op::Const { id } => {
                    let c = g.consts.get(*id).ok_or_else(|| node_err(format!("constant {id} is missing")))?;
                    vec![self.consts[*id].get_or_init(|| c.to_tensor()).clone()]
                }
                op => {
                    let mut args: Vec<Option<&Tensor>> =
                        wiring.iter().map(|v| v.and_then(|v| values.get(&v))).collect();
                    let replaced = hook(n, &args).map_err(node_err)?;
                    if let Some((slot, t)) = &replaced {
                        if *slot >= args.len() {
                            return Err(node_err(format!("a hook replaced input {slot}, which the node lacks")));
                        }
                        args[*slot] = Some(t);
                    }
                    let outs = eval_op(op, &args, node.outputs.len()).map_err(node_err)?;
                    if outs.len() < node.outputs.len() {
                        return Err(node_err(format!(
                            "produced {} outputs, {} declared",
                            outs.len(),
                            node.outputs.len()
                        )));
                    }
                    for (slot, t) in outs.iter().enumerate().take(node.outputs.len()) {
                        check_type(&node.outputs[slot].ty, t, &mut bind)
                            .map_err(|e| node_err(format!("output {slot} {e} (shape inference disagrees)")))?;
                    }
                    outs
                }
            };
            // Release inputs after their last read.
            for v in wiring.iter().flatten() {
                let r = remaining.get_mut(v).expect("counted in new()");
                *r -= 1;
                if *r == 0 {
                    values.remove(v);
                }
            }
            for (slot, t) in results.into_iter().enumerate().take(node.outputs.len()) {
                let v = ValueRef { node: n, slot };
                if g.outputs.iter().any(|o| o.value == v) {
                    outputs.insert(v, t.clone());
                }
                if remaining.get(&v).copied().unwrap_or(0) > 0 {
                    values.insert(v, t);
                }
            }
        }
        g.outputs
            .iter()
            .map(|o| {
                let t = outputs
                    .get(&o.value)
                    .cloned()
                    .ok_or_else(|| Error::invalid(format!("output '{}' was not computed", o.name)))?;
                Ok((o.name.clone(), t))
            })
            .collect()
    }
}

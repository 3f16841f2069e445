//! Merged projections (the attention's q/k/v): two or more matmuls reading the same input with
//! constant weights of the same K and scheme (both f32, or MatMulNBits with the same bits / block
//! size / accuracy level / zero points; fused epilogues with the same activation) become one
//! matmul over the weights concatenated along N, followed by a Split of its output. Decoding then
//! runs one larger matmul, which is split over the threads, instead of three small ones that are
//! each below the parallel threshold (SmolLM2's 576x192 k/v projections), and int8 activations
//! are rounded once instead of three times.

use std::collections::HashMap;

use super::pattern::{act_inputs, concat_nbits, concat_weights, linear, same_scheme, Linear};
use super::{Pass, PassStats};
use crate::error::{Error, Result};
use crate::ir::{Act, Dim, Graph, Op, Tensor, Value, ValueRef};

pub struct FuseQkv;

/// The linears reading `a`, grouped by what can share one weight.
fn groups(g: &Graph, a: ValueRef) -> Vec<Vec<Linear>> {
    let mut out: Vec<Vec<Linear>> = Vec::new();
    let mut users: Vec<_> = g.users_of(a).into_iter().filter(|&(_, slot)| slot == 0).map(|(u, _)| u).collect();
    users.sort();
    users.dedup();
    for u in users {
        let v = ValueRef { node: u, slot: 0 };
        let Some(l) = linear(g, v).filter(|l| l.a == a && !g.outputs.iter().any(|o| o.value == v)) else { continue };
        match out.iter_mut().find(|grp| same_scheme(&grp[0], &l) && grp[0].act == l.act) {
            Some(grp) => grp.push(l),
            None => out.push(vec![l]),
        }
    }
    out.retain(|grp| grp.len() >= 2);
    out
}

fn merge(g: &mut Graph, ls: &[Linear]) -> Result<()> {
    let names: Vec<String> = ls.iter().map(|l| g.g[l.node].name.clone()).collect();
    let name = names.join("+");
    let w = concat_weights(g, ls, &name);
    let nbits = concat_nbits(ls);
    let n_total: usize = ls.iter().map(|l| l.n).sum();
    let bias = if ls.iter().any(|l| l.bias.is_some()) {
        // Missing biases are zeros.
        let mut b = Vec::with_capacity(n_total);
        for l in ls {
            match l.bias {
                Some(v) => {
                    let t = g.const_of(v).expect("constant bias").to_tensor();
                    b.extend_from_slice(t.as_slice::<f32>().map_err(Error::Invalid)?);
                }
                None => b.resize(b.len() + l.n, 0.0),
            }
        }
        Some(g.add_const(format!("{name}.bias"), &Tensor::from_vec(vec![n_total], b)))
    } else {
        None
    };
    let a = ls[0].a;
    let (op, inputs) = match (ls[0].act, bias, nbits) {
        (Act::None, None, None) => (Op::MatMul, vec![Some(a), w[0]]),
        (Act::None, None, Some(q)) => (q.matmul_nbits(), vec![Some(a), w[0], w[1], w[2]]),
        (act, bias, nbits) => (Op::MatMulAct { act, glu: false, nbits }, act_inputs(a, &w, nbits.is_some(), bias)),
    };
    let mut ty = g.ty(ValueRef { node: ls[0].node, slot: 0 }).clone();
    let rank = ty.rank().ok_or_else(|| Error::Invalid(format!("{name}: output rank unknown")))?;
    if let Some(s) = ty.shape.as_mut() {
        s[rank - 1] = Dim::fixed(n_total as i64);
    }
    let merged = g.add_node(op, name.clone(), &inputs, vec![Value { name: format!("{name}_output"), ty }]);
    let sizes = g.add_const(
        format!("{name}.split"),
        &Tensor::from_vec(vec![ls.len()], ls.iter().map(|l| l.n as i64).collect::<Vec<i64>>()),
    );
    let outs: Vec<Value> = ls.iter().map(|l| g.value(ValueRef { node: l.node, slot: 0 }).clone()).collect();
    let split = g.add_node(
        Op::Split { axis: rank as i64 - 1, num_outputs: None },
        format!("{name}/Split"),
        &[Some(ValueRef { node: merged, slot: 0 }), Some(sizes)],
        outs,
    );
    for (i, l) in ls.iter().enumerate() {
        g.replace_uses(ValueRef { node: l.node, slot: 0 }, ValueRef { node: split, slot: i });
    }
    Ok(())
}

impl Pass for FuseQkv {
    fn name(&self) -> &'static str {
        "fuse-qkv"
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats> {
        let order = g.topo_order().map_err(Error::Invalid)?;
        // Every value read as the A of two or more matmuls.
        let mut readers: HashMap<ValueRef, usize> = HashMap::new();
        for &n in &order {
            if matches!(g.g[n].op, Op::MatMul | Op::MatMulNBits { .. } | Op::MatMulAct { .. }) {
                if let Some(a) = g.inputs_of(n)[0] {
                    *readers.entry(a).or_default() += 1;
                }
            }
        }
        let mut inputs: Vec<ValueRef> = readers.into_iter().filter(|&(_, c)| c >= 2).map(|(a, _)| a).collect();
        inputs.sort_by_key(|v| (v.node, v.slot));
        let mut changed = 0;
        for a in inputs {
            for grp in groups(g, a) {
                merge(g, &grp)?;
                changed += grp.len();
            }
        }
        if changed > 0 {
            super::dce::Dce.run(g)?;
        }
        Ok(PassStats { changed })
    }
}

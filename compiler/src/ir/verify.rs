//! Structural checks run after import and after every pass, so a pass that
//! breaks the graph is caught where it happened, not three passes later.

use super::{Graph, Op};
use petgraph::visit::EdgeRef;
use petgraph::Direction;

pub fn verify(g: &Graph) -> Result<(), String> {
    g.topo_order()?;
    for n in g.g.node_indices() {
        let node = &g.g[n];
        let here = || format!("node '{}' ({})", node.name, node.op.name());
        let (min, max) = node.op.arity();
        if node.num_inputs > max {
            return Err(format!("{}: {} inputs, at most {max} allowed", here(), node.num_inputs));
        }
        let ins = g.inputs_of(n);
        let mut seen = vec![false; node.num_inputs];
        for e in g.g.edges_directed(n, Direction::Incoming) {
            let w = e.weight();
            if w.dst >= node.num_inputs {
                return Err(format!("{}: edge into missing input slot {}", here(), w.dst));
            }
            if std::mem::replace(&mut seen[w.dst], true) {
                return Err(format!("{}: input slot {} is fed twice", here(), w.dst));
            }
            let producer = &g.g[e.source()];
            if w.src >= producer.outputs.len() {
                return Err(format!(
                    "{}: reads output {} of '{}', which has {}",
                    here(),
                    w.src,
                    producer.name,
                    producer.outputs.len()
                ));
            }
        }
        if let Some(slot) = ins.iter().take(min).position(|i| i.is_none()) {
            return Err(format!("{}: required input {slot} is missing", here()));
        }
        if node.outputs.is_empty() {
            return Err(format!("{}: no outputs", here()));
        }
        match &node.op {
            Op::Input { index } if g.inputs.get(*index) != Some(&n) => {
                return Err(format!("{}: not graph input {index}", here()));
            }
            Op::Const { id } => {
                let c = g.consts.get(*id).ok_or_else(|| format!("{}: no constant {id}", here()))?;
                let ty = &node.outputs[0].ty;
                if ty.dtype != c.dtype || ty.fixed_shape().as_deref() != Some(&c.shape[..]) {
                    return Err(format!("{}: type differs from its constant's {}{:?}", here(), c.dtype, c.shape));
                }
            }
            _ => {}
        }
    }
    for (i, &n) in g.inputs.iter().enumerate() {
        match g.g.node_weight(n).map(|x| &x.op) {
            Some(Op::Input { index }) if *index == i => {}
            _ => return Err(format!("graph input {i} is not an Input node")),
        }
    }
    for o in &g.outputs {
        let ok = g.g.node_weight(o.value.node).is_some_and(|n| o.value.slot < n.outputs.len());
        if !ok {
            return Err(format!("graph output '{}' refers to a missing value", o.name));
        }
    }
    Ok(())
}

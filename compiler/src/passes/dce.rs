//! Dead-code elimination: drops every node no graph output depends on (graph
//! inputs stay: they are the model's interface), then compacts the constant store.

use super::{Pass, PassStats};
use crate::error::Result;
use crate::ir::{ConstStore, Graph, Op};
use petgraph::Direction;
use std::collections::HashMap;

pub struct Dce;

impl Pass for Dce {
    fn name(&self) -> &'static str {
        "dce"
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats> {
        let mut live = std::collections::HashSet::new();
        let mut stack: Vec<_> = g.outputs.iter().map(|o| o.value.node).collect();
        stack.extend(g.inputs.iter().copied());
        while let Some(n) = stack.pop() {
            if live.insert(n) {
                stack.extend(g.g.neighbors_directed(n, Direction::Incoming));
            }
        }
        let dead: Vec<_> = g.g.node_indices().filter(|n| !live.contains(n)).collect();
        for &n in &dead {
            g.g.remove_node(n);
        }
        compact_consts(g);
        Ok(PassStats { changed: dead.len() })
    }
}

/// Rebuilds the constant store with only the constants that nodes still use.
fn compact_consts(g: &mut Graph) {
    let mut store = ConstStore::default();
    let mut remap = HashMap::new();
    let nodes: Vec<_> = g.g.node_indices().collect();
    for n in nodes {
        if let Op::Const { id } = g.g[n].op {
            let new_id = *remap.entry(id).or_insert_with(|| {
                let c = g.consts.get(id).expect("verified").clone();
                store.insert(c).expect("was valid in the old store")
            });
            g.g[n].op = Op::Const { id: new_id };
        }
    }
    g.consts = store;
}

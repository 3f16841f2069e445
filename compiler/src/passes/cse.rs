//! Common-subexpression elimination: two nodes with the same op, attributes and
//! inputs compute the same values, so the later one is replaced by the earlier.
//! Small constants with identical type and bytes are merged the same way
//! (exporters emit many copies of `[-1]`, `[0]`, `1.0`).

use super::{Pass, PassStats};
use crate::error::Result;
use crate::ir::{Graph, Op, ValueRef};
use std::collections::HashMap;

pub struct Cse;

/// Constants up to this size are compared by value.
const MAX_CONST_BYTES: usize = 4096;

impl Pass for Cse {
    fn name(&self) -> &'static str {
        "cse"
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats> {
        let order = g.topo_order().map_err(crate::Error::Invalid)?;
        let mut seen: HashMap<String, petgraph::stable_graph::NodeIndex> = HashMap::new();
        let mut changed = 0;
        for n in order {
            let node = &g.g[n];
            let key = match &node.op {
                Op::Input { .. } => continue,
                Op::Const { id } => {
                    let c = g.consts.get(*id).expect("verified");
                    if c.bytes.len() > MAX_CONST_BYTES {
                        continue;
                    }
                    format!("const {} {:?} {:?}", c.dtype, c.shape, &c.bytes[..])
                }
                op => format!("{op:?} {:?} {}", g.inputs_of(n), node.outputs.len()),
            };
            match seen.get(&key) {
                None => {
                    seen.insert(key, n);
                }
                Some(&first) => {
                    for slot in 0..g.g[n].outputs.len() {
                        g.replace_uses(ValueRef { node: n, slot }, ValueRef { node: first, slot });
                    }
                    g.g.remove_node(n);
                    changed += 1;
                }
            }
        }
        Ok(PassStats { changed })
    }
}

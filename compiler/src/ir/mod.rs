//! The intermediate representation: a petgraph of typed operations.
//!
//! Nodes are operations (`Op`) with their output types; an edge carries one
//! tensor from output slot `src` of its producer to input slot `dst` of its
//! consumer, whose type is the producer's output type at `src`. Graph inputs and
//! constants are nodes too (`Op::Input`, `Op::Const`), so every value has exactly
//! one producer and passes need no special cases for them.

pub mod consts;
pub mod dim;
pub mod dtype;
pub mod nbits;
pub mod op;
pub mod tensor;
pub mod text;
pub mod verify;

pub use consts::{ConstStore, Constant};
pub use dim::Dim;
pub use dtype::DType;
pub use op::{Act, BinaryOp, ConstId, ElemArg, ElemStep, NBitsAttrs, Op, ReduceKind, UnaryOp, VariadicOp};
pub use tensor::{Data, Elem, Tensor};

use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use std::collections::BTreeSet;

/// Shape of a tensor: `None` when even the rank is unknown.
pub type Shape = Option<Vec<Dim>>;

#[derive(Clone, Debug, PartialEq)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Shape,
}

impl TensorType {
    pub fn new(dtype: DType, dims: Vec<Dim>) -> TensorType {
        TensorType { dtype, shape: Some(dims) }
    }

    pub fn fixed(dtype: DType, dims: &[usize]) -> TensorType {
        TensorType::new(dtype, dims.iter().map(|&d| Dim::fixed(d as i64)).collect())
    }

    pub fn rank(&self) -> Option<usize> {
        self.shape.as_ref().map(|s| s.len())
    }

    /// The concrete shape, when every dim is fixed.
    pub fn fixed_shape(&self) -> Option<Vec<usize>> {
        self.shape.as_ref()?.iter().map(|d| d.as_fixed().map(|v| v as usize)).collect()
    }
}

#[derive(Clone, Debug)]
pub struct Node {
    pub op: Op,
    /// The ONNX node name (or output name when the node had none): for errors and the text form.
    pub name: String,
    /// Number of input slots, including optional slots left empty.
    pub num_inputs: usize,
    /// One entry per output slot; the name is the ONNX value name.
    pub outputs: Vec<Value>,
}

#[derive(Clone, Debug)]
pub struct Value {
    pub name: String,
    pub ty: TensorType,
}

/// An edge: output slot `src` of the producer feeds input slot `dst` of the consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edge {
    pub src: usize,
    pub dst: usize,
}

/// A value: output `slot` of `node`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueRef {
    pub node: NodeIndex,
    pub slot: usize,
}

#[derive(Clone, Debug)]
pub struct GraphOutput {
    pub name: String,
    pub value: ValueRef,
}

#[derive(Clone, Debug)]
pub struct Graph {
    pub name: String,
    /// The default-domain opset the model was imported at.
    pub opset: i64,
    pub g: StableDiGraph<Node, Edge>,
    /// `Op::Input` nodes in graph-input order.
    pub inputs: Vec<NodeIndex>,
    pub outputs: Vec<GraphOutput>,
    pub consts: ConstStore,
}

impl Graph {
    pub fn new(name: &str, opset: i64) -> Graph {
        Graph {
            name: name.to_string(),
            opset,
            g: StableDiGraph::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            consts: ConstStore::default(),
        }
    }

    pub fn node(&self, n: NodeIndex) -> &Node {
        &self.g[n]
    }

    pub fn value(&self, v: ValueRef) -> &Value {
        &self.g[v.node].outputs[v.slot]
    }

    pub fn ty(&self, v: ValueRef) -> &TensorType {
        &self.value(v).ty
    }

    /// Adds a node and wires its inputs (`None` leaves an optional slot empty).
    pub fn add_node(&mut self, op: Op, name: String, inputs: &[Option<ValueRef>], outputs: Vec<Value>) -> NodeIndex {
        let n = self.g.add_node(Node { op, name, num_inputs: inputs.len(), outputs });
        for (dst, v) in inputs.iter().enumerate() {
            if let Some(v) = v {
                self.g.add_edge(v.node, n, Edge { src: v.slot, dst });
            }
        }
        n
    }

    /// Adds a constant node for a tensor.
    pub fn add_const(&mut self, name: String, t: &Tensor) -> ValueRef {
        let id = self.consts.insert_tensor(name.clone(), t);
        let ty = TensorType::fixed(t.dtype(), &t.shape);
        let n = self.add_node(Op::Const { id }, name.clone(), &[], vec![Value { name, ty }]);
        ValueRef { node: n, slot: 0 }
    }

    /// The node's input slots in order.
    pub fn inputs_of(&self, n: NodeIndex) -> Vec<Option<ValueRef>> {
        let mut ins = vec![None; self.g[n].num_inputs];
        for e in self.g.edges_directed(n, Direction::Incoming) {
            let w = e.weight();
            if w.dst < ins.len() {
                ins[w.dst] = Some(ValueRef { node: e.source(), slot: w.src });
            }
        }
        ins
    }

    /// Every (consumer, input slot) that reads value `v`.
    pub fn users_of(&self, v: ValueRef) -> Vec<(NodeIndex, usize)> {
        let mut users: Vec<(NodeIndex, usize)> = self
            .g
            .edges_directed(v.node, Direction::Outgoing)
            .filter(|e| e.weight().src == v.slot)
            .map(|e| (e.target(), e.weight().dst))
            .collect();
        users.sort();
        users
    }

    /// Makes every reader of `old` (nodes and graph outputs) read `new` instead.
    pub fn replace_uses(&mut self, old: ValueRef, new: ValueRef) {
        let edges: Vec<_> = self
            .g
            .edges_directed(old.node, Direction::Outgoing)
            .filter(|e| e.weight().src == old.slot)
            .map(|e| (e.id(), e.target(), e.weight().dst))
            .collect();
        for (id, target, dst) in edges {
            self.g.remove_edge(id);
            self.g.add_edge(new.node, target, Edge { src: new.slot, dst });
        }
        for o in &mut self.outputs {
            if o.value == old {
                o.value = new;
            }
        }
    }

    /// Makes input `slot` of `node` read `v` (only that edge; other readers of the old value keep it).
    pub fn set_input(&mut self, node: NodeIndex, slot: usize, v: ValueRef) {
        let old: Vec<_> = self
            .g
            .edges_directed(node, Direction::Incoming)
            .filter(|e| e.weight().dst == slot)
            .map(|e| e.id())
            .collect();
        for e in old {
            self.g.remove_edge(e);
        }
        self.g.add_edge(v.node, node, Edge { src: v.slot, dst: slot });
    }

    /// Replaces graph input `name` by a constant (an AOT compiler specialises shape parameters such
    /// as axes or slice bounds that a model takes as inputs). The remaining inputs keep their order.
    pub fn freeze_input(&mut self, name: &str, t: &Tensor) -> Result<(), String> {
        let pos = self
            .inputs
            .iter()
            .position(|&n| self.g[n].outputs[0].name == name)
            .ok_or_else(|| format!("the graph has no input `{name}`"))?;
        let n = self.inputs[pos];
        let want = &self.g[n].outputs[0].ty;
        if want.dtype != t.dtype() {
            return Err(format!("input `{name}` is {}, the value given is {}", want.dtype, t.dtype()));
        }
        let c = self.add_const(name.to_string(), t);
        self.replace_uses(ValueRef { node: n, slot: 0 }, c);
        self.g.remove_node(n);
        self.inputs.remove(pos);
        for (i, &m) in self.inputs.iter().enumerate() {
            self.g[m].op = Op::Input { index: i };
        }
        Ok(())
    }

    /// Nodes in a deterministic topological order: Kahn's algorithm that always
    /// takes the ready node with the smallest index, so the text form is stable.
    pub fn topo_order(&self) -> Result<Vec<NodeIndex>, String> {
        let mut indeg: std::collections::HashMap<NodeIndex, usize> =
            self.g.node_indices().map(|n| (n, self.g.neighbors_directed(n, Direction::Incoming).count())).collect();
        let mut ready: BTreeSet<NodeIndex> = indeg.iter().filter(|(_, &d)| d == 0).map(|(&n, _)| n).collect();
        let mut order = Vec::with_capacity(indeg.len());
        while let Some(n) = ready.pop_first() {
            order.push(n);
            for m in self.g.neighbors_directed(n, Direction::Outgoing) {
                let d = indeg.get_mut(&m).unwrap();
                *d -= 1;
                if *d == 0 {
                    ready.insert(m);
                }
            }
        }
        if order.len() != self.g.node_count() {
            return Err("the graph has a cycle".into());
        }
        Ok(order)
    }

    /// Number of operation nodes (not counting inputs and constants).
    pub fn op_count(&self) -> usize {
        self.g.node_weights().filter(|n| !matches!(n.op, Op::Input { .. } | Op::Const { .. })).count()
    }

    /// The constant a value is, if it is produced by a `Const` node.
    pub fn const_of(&self, v: ValueRef) -> Option<&Constant> {
        match self.g[v.node].op {
            Op::Const { id } => self.consts.get(id),
            _ => None,
        }
    }
}

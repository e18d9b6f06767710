//! The graph IR: named nodes holding an [`Op`], ordered inputs and an inferred [`Shape`].
//!
//! Invariants (kept by [`Graph::add`], the only way to add a node):
//! - node names are unique; parameters are named `<layer>/<param>`;
//! - a node's inputs exist before it, so index order is a topological order and interpreters
//!   simply walk the nodes in order;
//! - every node's shape was inferred from its inputs' shapes when it was added.
//!
//! petgraph holds the edges (consumers, reachability); each node also keeps its ordered input
//! list, since an op's operands are positional.

mod builder;
mod file;
pub mod init;
pub mod op;
mod shape;

use std::collections::HashMap;

use petgraph::Direction;
use petgraph::graph::{DiGraph, NodeIndex};

pub use builder::{ConvSpec, DenseSpec};
pub use op::*;
pub use shape::{Shape, per_example_axis};

use crate::error::{Error, Result};

/// A node's handle. Handles are indices in insertion (and so topological) order.
pub type NodeId = NodeIndex<u32>;

/// One node of the graph.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub name: String,
    pub op: Op,
    pub inputs: Vec<NodeId>,
    pub shape: Shape,
}

/// A model graph: nodes in topological order plus the list of outputs.
#[derive(Clone, Debug)]
pub struct Graph {
    name: String,
    dag: DiGraph<Node, usize>,
    by_name: HashMap<String, NodeId>,
    outputs: Vec<NodeId>,
}

impl PartialEq for Graph {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.outputs == other.outputs
            && self.len() == other.len()
            && self.node_ids().all(|id| self.node(id) == other.node(id))
    }
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Graph {
        Graph { name: name.into(), dag: DiGraph::default(), by_name: HashMap::new(), outputs: Vec::new() }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn set_name(&mut self, name: impl Into<String>) {
        self.name = name.into();
    }

    /// Adds a node, checking its name, its inputs and its shape. The error names the node.
    pub fn add(&mut self, name: impl Into<String>, op: Op, inputs: &[NodeId]) -> Result<NodeId> {
        let name = name.into();
        let fail = |reason: String| Error::Node { node: name.clone(), op: op.kind(), reason };
        if name.is_empty() {
            return Err(fail("node names must not be empty".into()));
        }
        if self.by_name.contains_key(&name) {
            return Err(fail("a node with this name already exists; node names must be unique".into()));
        }
        if let Some(bad) = inputs.iter().find(|id| id.index() >= self.dag.node_count()) {
            return Err(fail(format!("input #{} does not exist in this graph", bad.index())));
        }
        let shapes: Vec<&Shape> = inputs.iter().map(|&i| &self.dag[i].shape).collect();
        let shape = op.infer_shape(&shapes).map_err(|reason| {
            let operands: Vec<String> =
                inputs.iter().map(|&i| format!("{} {}", self.dag[i].name, self.dag[i].shape)).collect();
            if operands.is_empty() { fail(reason) } else { fail(format!("{reason} (inputs: {})", operands.join(", "))) }
        })?;
        let id = self.dag.add_node(Node { name: name.clone(), op, inputs: inputs.to_vec(), shape });
        for (slot, &input) in inputs.iter().enumerate() {
            self.dag.add_edge(input, id, slot);
        }
        self.by_name.insert(name, id);
        Ok(id)
    }

    /// Marks a node as a graph output (the values `run` writes).
    pub fn add_output(&mut self, id: NodeId) {
        if !self.outputs.contains(&id) {
            self.outputs.push(id);
        }
    }

    pub fn set_outputs(&mut self, ids: Vec<NodeId>) {
        self.outputs = ids;
    }

    pub fn outputs(&self) -> &[NodeId] {
        &self.outputs
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.dag[id]
    }

    pub fn len(&self) -> usize {
        self.dag.node_count()
    }

    pub fn is_empty(&self) -> bool {
        self.dag.node_count() == 0
    }

    /// Every node id in topological order.
    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.dag.node_indices()
    }

    /// Every node in topological order, with its id.
    pub fn nodes(&self) -> impl Iterator<Item = (NodeId, &Node)> + '_ {
        self.dag.node_indices().map(move |id| (id, &self.dag[id]))
    }

    pub fn find(&self, name: &str) -> Option<NodeId> {
        self.by_name.get(name).copied()
    }

    /// Looks a node up by name, with an error that lists what the graph has of that kind.
    pub fn expect(&self, name: &str) -> Result<NodeId> {
        self.find(name)
            .ok_or_else(|| Error::Graph { graph: self.name.clone(), reason: format!("has no node named '{name}'") })
    }

    /// The nodes that read `id`'s value, in topological order (each once).
    pub fn consumers(&self, id: NodeId) -> Vec<NodeId> {
        let mut out: Vec<NodeId> = self.dag.neighbors_directed(id, Direction::Outgoing).collect();
        out.sort();
        out.dedup();
        out
    }

    /// The graph's Input nodes, in order.
    pub fn inputs(&self) -> Vec<NodeId> {
        self.nodes().filter(|(_, n)| matches!(n.op, Op::Input(_))).map(|(id, _)| id).collect()
    }

    /// The graph's Parameter nodes, in order.
    pub fn parameters(&self) -> Vec<NodeId> {
        self.nodes().filter(|(_, n)| matches!(n.op, Op::Parameter(_))).map(|(id, _)| id).collect()
    }

    /// Trainable parameter nodes, in order.
    pub fn trainable_parameters(&self) -> Vec<NodeId> {
        self.nodes().filter(|(_, n)| matches!(&n.op, Op::Parameter(p) if p.trainable)).map(|(id, _)| id).collect()
    }

    /// Makes parameter `name` trainable or frozen (a frozen parameter gets no gradient and no
    /// update: transfer learning's fixed features).
    pub fn set_trainable(&mut self, name: &str, trainable: bool) -> Result<()> {
        let id = self.expect(name)?;
        match &mut self.dag[id].op {
            Op::Parameter(p) => {
                p.trainable = trainable;
                Ok(())
            }
            _ => Err(self.graph_error(format!("'{name}' is not a parameter, so it cannot be frozen or trained"))),
        }
    }

    /// The number of trainable parameter values.
    pub fn trainable_param_count(&self) -> usize {
        self.trainable_parameters().iter().map(|&id| self.node(id).shape.numel()).sum()
    }

    /// The nodes `roots` depend on (including themselves), as a mask indexed by node.
    pub fn ancestors(&self, roots: &[NodeId]) -> Vec<bool> {
        let mut needed = vec![false; self.len()];
        for &r in roots {
            needed[r.index()] = true;
        }
        for id in self.node_ids().collect::<Vec<_>>().into_iter().rev() {
            if needed[id.index()] {
                for &i in &self.dag[id].inputs {
                    needed[i.index()] = true;
                }
            }
        }
        needed
    }

    /// The first SoftmaxCrossEntropy node, if the graph already has a loss.
    pub fn loss_node(&self) -> Option<NodeId> {
        self.nodes().find(|(_, n)| matches!(n.op, Op::SoftmaxCrossEntropy(_))).map(|(id, _)| id)
    }

    pub(crate) fn graph_error(&self, reason: impl Into<String>) -> Error {
        Error::Graph { graph: self.name.clone(), reason: reason.into() }
    }
}

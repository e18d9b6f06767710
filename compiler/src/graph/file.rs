//! Model files: graphs as RON text.
//!
//! A file lists the nodes in order (each node's inputs by name, defined above it) and the
//! outputs. Shapes are not stored: they are inferred again on load, so a file cannot disagree
//! with itself. Syntax errors and graph errors both come back with the file's line and column.

use std::path::Path;

use ron::extensions::Extensions;
use serde::{Deserialize, Serialize};

use super::{Graph, Op};
use crate::error::{Error, Result};

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GraphFile {
    name: String,
    nodes: Vec<NodeDef>,
    outputs: Vec<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeDef {
    name: String,
    op: Op,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    inputs: Vec<String>,
}

fn extensions() -> Extensions {
    Extensions::UNWRAP_VARIANT_NEWTYPES | Extensions::IMPLICIT_SOME
}

impl Graph {
    /// The graph as RON text (the format [`Graph::from_ron`] reads).
    pub fn to_ron(&self) -> String {
        let file = GraphFile {
            name: self.name.clone(),
            nodes: self
                .nodes()
                .map(|(_, n)| NodeDef {
                    name: n.name.clone(),
                    op: n.op.clone(),
                    inputs: n.inputs.iter().map(|&i| self.node(i).name.clone()).collect(),
                })
                .collect(),
            outputs: self.outputs.iter().map(|&o| self.node(o).name.clone()).collect(),
        };
        let config =
            ron::ser::PrettyConfig::new().depth_limit(3).indentor("  ").struct_names(false).extensions(extensions());
        ron::ser::to_string_pretty(&file, config).expect("graphs always serialise")
    }

    /// Parses RON text; `origin` names the source in errors (a path, or `<string>`).
    pub fn from_ron(text: &str, origin: &Path) -> Result<Graph> {
        let file: GraphFile =
            ron::Options::default().with_default_extension(extensions()).from_str(text).map_err(|e| {
                Error::ModelFile {
                    path: origin.to_path_buf(),
                    line: e.span.start.line,
                    col: e.span.start.col,
                    reason: e.code.to_string(),
                }
            })?;
        // The n-th definition of a name (n > 0 only for duplicates) is where its errors point.
        let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        let at = |node: &str, nth: usize, reason: String| {
            let (line, col) = locate_node(text, node, nth);
            Error::ModelFile { path: origin.to_path_buf(), line, col, reason }
        };
        let mut graph = Graph::new(file.name);
        for def in file.nodes {
            let nth = *seen.entry(def.name.clone()).and_modify(|n| *n += 1).or_insert(0);
            let mut inputs = Vec::with_capacity(def.inputs.len());
            for input in &def.inputs {
                match graph.find(input) {
                    Some(id) => inputs.push(id),
                    None => {
                        return Err(at(
                            &def.name,
                            nth,
                            format!(
                                "node '{}': input '{input}' is not defined above it (define nodes before their use)",
                                def.name
                            ),
                        ));
                    }
                }
            }
            let name = def.name.clone();
            graph.add(def.name, def.op, &inputs).map_err(|e| at(&name, nth, e.to_string()))?;
        }
        if file.outputs.is_empty() {
            return Err(Error::ModelFile {
                path: origin.to_path_buf(),
                line: 1,
                col: 1,
                reason: "the graph lists no outputs; add `outputs: [\"<node>\"]`".into(),
            });
        }
        for out in &file.outputs {
            let id = graph.find(out).ok_or_else(|| {
                let (line, col) = locate(text, "outputs");
                Error::ModelFile {
                    path: origin.to_path_buf(),
                    line,
                    col,
                    reason: format!("output '{out}' is not a node of the graph"),
                }
            })?;
            graph.add_output(id);
        }
        Ok(graph)
    }

    /// Reads a `.ron` model file.
    pub fn load(path: impl AsRef<Path>) -> Result<Graph> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Graph::from_ron(&text, path)
    }

    /// Writes the graph as a `.ron` model file (atomically: a temporary file, then a rename).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        crate::tensors::write_atomically(path.as_ref(), self.to_ron().as_bytes())
    }
}

/// The 1-based line and column of byte `offset`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = offset - before.rfind('\n').map_or(0, |p| p + 1) + 1;
    (line, col)
}

/// The 1-based line and column of `needle`'s first occurrence (1:1 when absent).
fn locate(text: &str, needle: &str) -> (usize, usize) {
    text.find(needle).map_or((1, 1), |offset| line_col(text, offset))
}

/// Where the `nth` definition (`name: "<node>"`) of a node is in the file text.
fn locate_node(text: &str, node: &str, nth: usize) -> (usize, usize) {
    let quoted = format!("\"{node}\"");
    let mut offset = 0;
    let mut found = 0;
    while let Some(pos) = text[offset..].find(&quoted) {
        let at = offset + pos;
        let head = text[..at].trim_end();
        if head.ends_with(':') && head[..head.len() - 1].trim_end().ends_with("name") {
            if found == nth {
                return line_col(text, at);
            }
            found += 1;
        }
        offset = at + quoted.len();
    }
    locate(text, &quoted)
}

//! One error type for the compiler. Every variant names where the problem is:
//! the file, the node and op, or the tensor.

use std::fmt;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq)]
pub struct Unsupported {
    pub node: String,
    pub op: String,
    pub opset: i64,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed ONNX model {path}: {msg}")]
    Malformed { path: String, msg: String },
    #[error("{}", UnsupportedList(.0))]
    Unsupported(Vec<Unsupported>),
    #[error("node '{node}' ({op}, opset {opset}): {msg}")]
    Node { node: String, op: String, opset: i64, msg: String },
    #[error("{0}")]
    Invalid(String),
}

struct UnsupportedList<'a>(&'a [Unsupported]);

impl fmt::Display for UnsupportedList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let mut ops: Vec<&str> = self.0.iter().map(|u| u.op.as_str()).collect();
        ops.sort();
        ops.dedup();
        write!(f, "the model uses {} unsupported op(s): {}", ops.len(), ops.join(", "))?;
        for u in self.0 {
            write!(f, "\n  node '{}' ({}, opset {}): {}", u.node, u.op, u.opset, u.reason)?;
        }
        Ok(())
    }
}

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Error {
        Error::Invalid(msg.into())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

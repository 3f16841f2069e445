//! ONNX import: protobuf decoding (prost types generated from the official
//! `onnx.proto`), tensor data (inline, typed fields and external data through a
//! memory map) and the translation of nodes into IR ops.

pub mod attrs;
pub mod import;
pub mod ops;
pub mod tensor;

pub mod proto {
    #![allow(clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

pub use import::{import_model, load_model, load_model_bytes};

/// Opsets of the default domain whose semantics the importer implements.
pub const MIN_OPSET: i64 = 13;
pub const MAX_OPSET: i64 = 28;

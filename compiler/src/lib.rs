//! edgec: an ahead-of-time compiler for transformer models on edge devices.
//!
//! Stages, one folder each: `onnx` (import) -> `ir` (graph, text form, verifier)
//! -> `passes` (pass manager and IR-to-IR passes) -> `interp` (the reference
//! interpreter every later stage is checked against).

pub mod calib;
pub mod codegen;
pub mod error;
pub mod interp;
pub mod ir;
pub mod npy;
pub mod onnx;
pub mod passes;

pub use error::{Error, Result};

//! edgec-runtime: the thin on-device loader and runner for `.edgec` artifacts.
//!
//! It depends on neither Cranelift nor the compiler, so a device needs only this
//! crate and one artifact file. The artifact format and the loader arrive with
//! native code generation; until then the crate holds no code.

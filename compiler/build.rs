//! Compiles the official `onnx.proto` (proto2, IR v11+) with prost. protox parses the
//! file in pure Rust, so no `protoc` binary is needed on the build machine.
fn main() {
    let proto = "proto/onnx.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"]).expect("onnx.proto must parse");
    let mut cfg = prost_build::Config::new();
    // `bytes` fields become `bytes::Bytes`: decoding from a memory map then borrows
    // tensor raw_data instead of copying it.
    cfg.bytes(["."]);
    cfg.compile_fds(fds).expect("prost code generation for onnx.proto");
}

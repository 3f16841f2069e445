//! Element types the IR and the reference interpreter support: the runtime's own `DType` (one
//! definition for compiler and device), plus the ONNX data-type codes the importer maps.

pub use edgec_runtime::DType;

/// The ONNX `TensorProto.DataType` code of a dtype.
pub fn onnx_code(dt: DType) -> i32 {
    match dt {
        DType::F32 => 1,
        DType::U8 => 2,
        DType::I8 => 3,
        DType::I32 => 6,
        DType::I64 => 7,
        DType::Bool => 9,
        DType::F64 => 11,
    }
}

pub fn from_onnx_code(code: i32) -> Option<DType> {
    DType::ALL.into_iter().find(|d| onnx_code(*d) == code)
}

/// The ONNX name of a data type code, for error messages about types we lack.
pub fn onnx_code_name(code: i32) -> &'static str {
    match code {
        0 => "UNDEFINED",
        1 => "FLOAT",
        2 => "UINT8",
        3 => "INT8",
        4 => "UINT16",
        5 => "INT16",
        6 => "INT32",
        7 => "INT64",
        8 => "STRING",
        9 => "BOOL",
        10 => "FLOAT16",
        11 => "DOUBLE",
        12 => "UINT32",
        13 => "UINT64",
        14 => "COMPLEX64",
        15 => "COMPLEX128",
        16 => "BFLOAT16",
        17..=20 => "FLOAT8",
        21 => "UINT4",
        22 => "INT4",
        23 => "FLOAT4E2M1",
        _ => "an unknown type",
    }
}

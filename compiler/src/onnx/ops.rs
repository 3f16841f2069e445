//! ONNX node -> IR op, for every supported op at every opset from 13 to 28.
//!
//! Where an op's signature changed inside that range the version decides how it
//! is read: ReduceMean & co. take `axes` as an attribute before opset 18 and as an
//! input from 18; Split gains `num_outputs` in 18; Shape gains start/end in 15.
//! Versions that only widen the type list (Cast 19/21/23/24/25, Reshape 19/21,
//! QuantizeLinear 19/21/23, ...) share semantics for the types the IR has.

use super::attrs::Attrs;
use super::proto::NodeProto;
use super::tensor::dtype_of;
use crate::ir::{BinaryOp, DType, Op, ReduceKind, Tensor, UnaryOp, VariadicOp};

pub enum Converted {
    Op(Op),
    /// A `Constant` node: becomes a constant-store entry.
    Constant(Tensor),
}

pub enum ConvertError {
    /// The op (or this use of it) is not implemented: reported with all others.
    Unsupported(String),
    /// The node itself is malformed (bad attribute value).
    Invalid(String),
}

impl From<String> for ConvertError {
    fn from(s: String) -> Self {
        ConvertError::Invalid(s)
    }
}

/// The opset that introduced ops newer than 13 (a model at an older opset may not use them).
fn introduced_in(op_type: &str) -> i64 {
    match op_type {
        "Trilu" | "HardSwish" => 14,
        "LayerNormalization" => 17,
        "Gelu" => 20,
        "RMSNormalization" => 23,
        _ => 1,
    }
}

/// Every op type this importer understands (default domain).
pub const SUPPORTED_OPS: &[&str] = &[
    "Abs",
    "Add",
    "And",
    "ArgMax",
    "ArgMin",
    "Cast",
    "CastLike",
    "Ceil",
    "Clip",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Cos",
    "CumSum",
    "DequantizeLinear",
    "Div",
    "Dropout",
    "DynamicQuantizeLinear",
    "Elu",
    "Equal",
    "Erf",
    "Exp",
    "Expand",
    "Flatten",
    "Floor",
    "Gather",
    "GatherElements",
    "GatherND",
    "Gelu",
    "Gemm",
    "Greater",
    "GreaterOrEqual",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "IsInf",
    "IsNaN",
    "LayerNormalization",
    "LeakyRelu",
    "Less",
    "LessOrEqual",
    "Log",
    "LogSoftmax",
    "MatMul",
    "MatMulInteger",
    "Max",
    "Mean",
    "Min",
    "Mod",
    "Mul",
    "Neg",
    "Not",
    "Or",
    "Pow",
    "QuantizeLinear",
    "Range",
    "Reciprocal",
    "RMSNormalization",
    "ReduceL2",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "ReduceSum",
    "ReduceSumSquare",
    "Relu",
    "Reshape",
    "Round",
    "Shape",
    "Sigmoid",
    "Sign",
    "Sin",
    "Size",
    "Slice",
    "Softmax",
    "Softplus",
    "Split",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Sum",
    "Tanh",
    "Tile",
    "Transpose",
    "Trilu",
    "Unsqueeze",
    "Where",
    "Xor",
];

pub fn convert(node: &NodeProto, opset: i64) -> Result<Converted, ConvertError> {
    let op_type = node.op_type.as_deref().unwrap_or("");
    let a = Attrs::new(node);
    let unsupported = |why: String| Err(ConvertError::Unsupported(why));
    if !SUPPORTED_OPS.contains(&op_type) {
        return unsupported("no implementation of this op".into());
    }
    let since = introduced_in(op_type);
    if opset < since {
        return unsupported(format!("{op_type} is not defined before opset {since}"));
    }
    a.check_no_refs()?;
    let unary = |u: UnaryOp| Ok(Converted::Op(Op::Unary(u)));
    let binary = |b: BinaryOp| Ok(Converted::Op(Op::Binary(b)));
    let reduce = |kind: ReduceKind| -> Result<Converted, ConvertError> {
        // ReduceSum moved axes to an input at 13, the others at 18.
        let axes_is_input = kind == ReduceKind::Sum || opset >= 18;
        if axes_is_input && a.has("axes") {
            return Err(ConvertError::Invalid(format!("'axes' is an input, not an attribute, at opset {opset}")));
        }
        Ok(Converted::Op(Op::Reduce {
            kind,
            axes: if axes_is_input { None } else { a.ints("axes")? },
            keepdims: a.bool("keepdims", true)?,
            noop_with_empty_axes: a.bool("noop_with_empty_axes", false)?,
        }))
    };
    let op = match op_type {
        "Constant" => return constant(&a).map(Converted::Constant),
        "Abs" => return unary(UnaryOp::Abs),
        "Neg" => return unary(UnaryOp::Neg),
        "Sqrt" => return unary(UnaryOp::Sqrt),
        "Reciprocal" => return unary(UnaryOp::Reciprocal),
        "Exp" => return unary(UnaryOp::Exp),
        "Log" => return unary(UnaryOp::Log),
        "Erf" => return unary(UnaryOp::Erf),
        "Tanh" => return unary(UnaryOp::Tanh),
        "Sigmoid" => return unary(UnaryOp::Sigmoid),
        "Relu" => return unary(UnaryOp::Relu),
        "Not" => return unary(UnaryOp::Not),
        "IsNaN" => return unary(UnaryOp::IsNaN),
        "IsInf" => {
            return unary(UnaryOp::IsInf {
                detect_negative: a.bool("detect_negative", true)?,
                detect_positive: a.bool("detect_positive", true)?,
            })
        }
        "Floor" => return unary(UnaryOp::Floor),
        "Ceil" => return unary(UnaryOp::Ceil),
        "Round" => return unary(UnaryOp::Round),
        "Sign" => return unary(UnaryOp::Sign),
        "Sin" => return unary(UnaryOp::Sin),
        "Cos" => return unary(UnaryOp::Cos),
        "Softplus" => return unary(UnaryOp::Softplus),
        "HardSwish" => return unary(UnaryOp::HardSwish),
        "LeakyRelu" => return unary(UnaryOp::LeakyRelu { alpha: a.float("alpha", 0.01)? }),
        "Elu" => return unary(UnaryOp::Elu { alpha: a.float("alpha", 1.0)? }),
        "HardSigmoid" => {
            return unary(UnaryOp::HardSigmoid { alpha: a.float("alpha", 0.2)?, beta: a.float("beta", 0.5)? })
        }
        "Gelu" => {
            let tanh_approx = match a.string("approximate", "none")?.as_str() {
                "none" => false,
                "tanh" => true,
                other => return Err(ConvertError::Invalid(format!("unknown approximate='{other}'"))),
            };
            return unary(UnaryOp::Gelu { tanh_approx });
        }
        "Add" => return binary(BinaryOp::Add),
        "Sub" => return binary(BinaryOp::Sub),
        "Mul" => return binary(BinaryOp::Mul),
        "Div" => return binary(BinaryOp::Div),
        "Pow" => return binary(BinaryOp::Pow),
        "Mod" => return binary(BinaryOp::Mod { fmod: a.bool("fmod", false)? }),
        "Equal" => return binary(BinaryOp::Equal),
        "Less" => return binary(BinaryOp::Less),
        "LessOrEqual" => return binary(BinaryOp::LessOrEqual),
        "Greater" => return binary(BinaryOp::Greater),
        "GreaterOrEqual" => return binary(BinaryOp::GreaterOrEqual),
        "And" => return binary(BinaryOp::And),
        "Or" => return binary(BinaryOp::Or),
        "Xor" => return binary(BinaryOp::Xor),
        "Min" => Op::Variadic(VariadicOp::Min),
        "Max" => Op::Variadic(VariadicOp::Max),
        "Sum" => Op::Variadic(VariadicOp::Sum),
        "Mean" => Op::Variadic(VariadicOp::Mean),
        "Where" => Op::Where,
        "Clip" => Op::Clip,
        "Cast" => {
            let to = a.opt_int("to")?.ok_or("Cast needs the 'to' attribute".to_string())?;
            let to = dtype_of(to as i32).map_err(|e| ConvertError::Unsupported(format!("Cast to {e}")))?;
            Op::Cast { to }
        }
        "CastLike" => Op::CastLike,
        "Identity" => Op::Identity,
        "Dropout" => Op::Dropout,
        "MatMul" => Op::MatMul,
        "MatMulInteger" => Op::MatMulInteger,
        "Gemm" => Op::Gemm {
            alpha: a.float("alpha", 1.0)?,
            beta: a.float("beta", 1.0)?,
            trans_a: a.bool("transA", false)?,
            trans_b: a.bool("transB", false)?,
        },
        "Softmax" => Op::Softmax { axis: a.int("axis", -1)? },
        "LogSoftmax" => Op::LogSoftmax { axis: a.int("axis", -1)? },
        "LayerNormalization" => {
            let stash = a.int("stash_type", 1)?;
            if stash != 1 {
                return unsupported(format!("stash_type={stash} (only float32 statistics)"));
            }
            Op::LayerNorm { axis: a.int("axis", -1)?, epsilon: a.float("epsilon", 1e-5)? }
        }
        "RMSNormalization" => {
            let stash = a.int("stash_type", 1)?;
            if stash != 1 {
                return unsupported(format!("stash_type={stash} (only float32 statistics)"));
            }
            Op::RmsNorm { axis: a.int("axis", -1)?, epsilon: a.float("epsilon", 1e-5)? }
        }
        "ReduceMean" => return reduce(ReduceKind::Mean),
        "ReduceSum" => return reduce(ReduceKind::Sum),
        "ReduceMax" => return reduce(ReduceKind::Max),
        "ReduceMin" => return reduce(ReduceKind::Min),
        "ReduceProd" => return reduce(ReduceKind::Prod),
        "ReduceL2" => return reduce(ReduceKind::L2),
        "ReduceSumSquare" => return reduce(ReduceKind::SumSquare),
        "ArgMax" | "ArgMin" => Op::ArgReduce {
            max: op_type == "ArgMax",
            axis: a.int("axis", 0)?,
            keepdims: a.bool("keepdims", true)?,
            select_last_index: a.bool("select_last_index", false)?,
        },
        "Transpose" => Op::Transpose { perm: a.ints("perm")? },
        "Reshape" => Op::Reshape { allowzero: a.bool("allowzero", false)? },
        "Flatten" => Op::Flatten { axis: a.int("axis", 1)? },
        "Squeeze" => Op::Squeeze,
        "Unsqueeze" => Op::Unsqueeze,
        "Concat" => Op::Concat { axis: a.opt_int("axis")?.ok_or("Concat needs 'axis'".to_string())? },
        "Split" => Op::Split {
            axis: a.int("axis", 0)?,
            num_outputs: if opset >= 18 { a.opt_int("num_outputs")? } else { None },
        },
        "Slice" => Op::Slice,
        "Expand" => Op::Expand,
        "Tile" => Op::Tile,
        "Shape" => Op::Shape { start: a.int("start", 0)?, end: a.opt_int("end")? },
        "Size" => Op::Size,
        "ConstantOfShape" => Op::ConstantOfShape {
            value: match a.tensor("value").map_err(ConvertError::Unsupported)? {
                Some(t) if t.len() == 1 => t.reshaped(vec![]),
                Some(_) => return Err(ConvertError::Invalid("'value' must hold one element".into())),
                None => Tensor::scalar(0.0f32),
            },
        },
        "Range" => Op::Range,
        "Gather" => Op::Gather { axis: a.int("axis", 0)? },
        "GatherElements" => Op::GatherElements { axis: a.int("axis", 0)? },
        "GatherND" => Op::GatherND { batch_dims: a.int("batch_dims", 0)? },
        "Trilu" => Op::Trilu { upper: a.bool("upper", true)? },
        "CumSum" => Op::CumSum { exclusive: a.bool("exclusive", false)?, reverse: a.bool("reverse", false)? },
        "QuantizeLinear" => {
            let output_dtype = match a.int("output_dtype", 0)? {
                0 => None,
                code => Some(dtype_of(code as i32).map_err(ConvertError::Unsupported)?),
            };
            if let Some(d) = output_dtype {
                if !matches!(d, DType::I8 | DType::U8) {
                    return unsupported(format!("QuantizeLinear to {d}"));
                }
            }
            if a.int("precision", 0)? != 0 {
                return unsupported("a 'precision' other than the default".into());
            }
            Op::QuantizeLinear {
                axis: a.int("axis", 1)?,
                saturate: a.bool("saturate", true)?,
                block_size: a.int("block_size", 0)?,
                output_dtype,
            }
        }
        "DequantizeLinear" => {
            match a.int("output_dtype", 0)? {
                0 | 1 => {}
                code => return unsupported(format!("output_dtype {}", crate::ir::dtype::onnx_code_name(code as i32))),
            }
            Op::DequantizeLinear { axis: a.int("axis", 1)?, block_size: a.int("block_size", 0)? }
        }
        "DynamicQuantizeLinear" => Op::DynamicQuantizeLinear,
        _ => return unsupported("no implementation of this op".into()),
    };
    Ok(Converted::Op(op))
}

/// The value of a `Constant` node, from whichever of its value attributes is set.
fn constant(a: &Attrs) -> Result<Tensor, ConvertError> {
    if let Some(t) = a.tensor("value").map_err(ConvertError::Unsupported)? {
        return Ok(t);
    }
    if a.has("value_float") {
        return Ok(Tensor::scalar(a.float("value_float", 0.0)?));
    }
    if a.has("value_int") {
        return Ok(Tensor::scalar(a.int("value_int", 0)?));
    }
    if let Some(a2) = a.get("value_floats") {
        return Ok(Tensor::from_vec(vec![a2.floats.len()], a2.floats.clone()));
    }
    if let Some(v) = a.ints("value_ints")? {
        return Ok(Tensor::from_vec(vec![v.len()], v));
    }
    if a.has("sparse_value") || a.has("value_string") || a.has("value_strings") {
        return Err(ConvertError::Unsupported("sparse or string constants".into()));
    }
    Err(ConvertError::Invalid("Constant has no value attribute".into()))
}

/// com.microsoft MatMulNBits (onnxruntime's 4/8-bit weight-only matmul).
pub fn matmul_nbits(node: &NodeProto) -> Result<Converted, ConvertError> {
    let a = Attrs::new(node);
    let need = |name: &str| -> Result<usize, ConvertError> {
        let v = a.opt_int(name).map_err(ConvertError::Invalid)?;
        let v = v.ok_or_else(|| ConvertError::Invalid(format!("MatMulNBits needs the '{name}' attribute")))?;
        usize::try_from(v).map_err(|_| ConvertError::Invalid(format!("MatMulNBits '{name}' = {v} is negative")))
    };
    let (k, n, bits, block_size) = (need("K")?, need("N")?, need("bits")?, need("block_size")?);
    let accuracy_level = a.int("accuracy_level", 0).map_err(ConvertError::Invalid)?;
    if !(0..=4).contains(&accuracy_level) {
        return Err(ConvertError::Invalid("MatMulNBits accuracy_level must be 0..=4".into()));
    }
    // Levels 1-3 only allow onnxruntime lower-precision float math: edgec computes in f32.
    let accuracy_level = if accuracy_level == 4 { 4 } else { 0 };
    crate::ir::nbits::NBitsLayout::new(k, n, bits, block_size).map_err(ConvertError::Unsupported)?;
    if node.input.len() > 4 && node.input[4..].iter().any(|s| !s.is_empty()) {
        return Err(ConvertError::Unsupported("MatMulNBits with g_idx or bias inputs".into()));
    }
    Ok(Converted::Op(Op::MatMulNBits { k, n, bits, block_size, accuracy_level, act: None }))
}

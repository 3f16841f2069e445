//! IR operations with typed attributes. Import normalises every supported ONNX
//! opset version (13..=28) to one variant per semantic, e.g. ReduceMean's axes
//! attribute (< 18) and input (>= 18) both map to `Op::Reduce`.

use super::dtype::DType;
use super::tensor::Tensor;

/// Index into the graph's constant store.
pub type ConstId = usize;

#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Graph input number `index`.
    Input {
        index: usize,
    },
    /// A weight or folded constant.
    Const {
        id: ConstId,
    },
    Unary(UnaryOp),
    Binary(BinaryOp),
    /// Min, Max, Sum, Mean over any number of broadcast inputs.
    Variadic(VariadicOp),
    Where,
    /// Inputs: x, min (optional), max (optional).
    Clip,
    Cast {
        to: DType,
    },
    CastLike,
    Identity,
    /// Inference-mode dropout: identity, plus an all-true mask when asked for.
    Dropout,
    MatMul,
    MatMulInteger,
    Gemm {
        alpha: f32,
        beta: f32,
        trans_a: bool,
        trans_b: bool,
    },
    Softmax {
        axis: i64,
    },
    LogSoftmax {
        axis: i64,
    },
    LayerNorm {
        axis: i64,
        epsilon: f32,
    },
    /// Axes come from the attribute (opset < 18, except ReduceSum) or input 1.
    Reduce {
        kind: ReduceKind,
        axes: Option<Vec<i64>>,
        keepdims: bool,
        noop_with_empty_axes: bool,
    },
    ArgReduce {
        max: bool,
        axis: i64,
        keepdims: bool,
        select_last_index: bool,
    },
    Transpose {
        perm: Option<Vec<i64>>,
    },
    Reshape {
        allowzero: bool,
    },
    Flatten {
        axis: i64,
    },
    /// Axes from input 1 (opset >= 13); all size-1 dims when absent.
    Squeeze,
    Unsqueeze,
    Concat {
        axis: i64,
    },
    /// Sizes from input 1, else `num_outputs` (opset 18) or the node's output count.
    Split {
        axis: i64,
        num_outputs: Option<i64>,
    },
    /// Inputs: data, starts, ends, axes (optional), steps (optional).
    Slice,
    Expand,
    Tile,
    Shape {
        start: i64,
        end: Option<i64>,
    },
    Size,
    ConstantOfShape {
        value: Tensor,
    },
    Range,
    Gather {
        axis: i64,
    },
    GatherElements {
        axis: i64,
    },
    GatherND {
        batch_dims: i64,
    },
    Trilu {
        upper: bool,
    },
    CumSum {
        exclusive: bool,
        reverse: bool,
    },
    QuantizeLinear {
        axis: i64,
        saturate: bool,
        block_size: i64,
        output_dtype: Option<DType>,
    },
    DequantizeLinear {
        axis: i64,
        block_size: i64,
    },
    DynamicQuantizeLinear,
    /// ONNX RMSNormalization (opset 23): `x / sqrt(mean(x^2 over axis..) + epsilon) * scale`.
    /// Produced by the `fuse-rms-norm` pass from the exporters' Pow/ReduceMean/Sqrt chain.
    RmsNorm {
        axis: i64,
        epsilon: f32,
    },
    /// Scaled dot-product attention, the fused form of `softmax(q @ k^T * scale + mask) @ v`.
    /// Inputs: q [b, hq, s, d], k [b, hkv, t, d], v [b, hkv, t, dv], optional additive mask
    /// broadcastable to [b, hq, s, t]. Output [b, hq, s, dv]. `hq` is a multiple of `hkv`:
    /// query head h reads kv head h / (hq / hkv) (grouped-query attention, ONNX Attention's rule).
    Attention {
        scale: f32,
    },
    /// onnxruntime's MatMulNBits (domain com.microsoft): A [..., K] times a K x N weight stored
    /// quantized in blocks of `block_size` along K. Inputs: A (f32), B (u8 [N, blocks,
    /// block_size * bits / 8], low nibble first), scales (f32, N * blocks), zero points
    /// (optional, u8 packed like B; default 2^(bits - 1)). `--quantize` writes this op; edgec
    /// also accepts `block_size = K` (one block per column: per-channel) for any K.
    /// `accuracy_level` 4 (onnxruntime's int8 compute type) first rounds A to int8 with one scale
    /// per row and block (max |x| / 127), so kernels can use integer dot products.
    /// `act` (edgec's own extension) instead rounds A with one static scale and zero point
    /// (`nbits::ActQuant`: ONNX QuantizeLinear then DequantizeLinear), whatever `accuracy_level`.
    MatMulNBits {
        k: usize,
        n: usize,
        bits: usize,
        block_size: usize,
        accuracy_level: i64,
        act: Option<super::nbits::ActQuant>,
    },
    /// A matmul with its epilogue, the fused form of `act(x @ W + bias)` (`fuse-matmul-epilogue`)
    /// and of the SwiGLU product `silu(x @ Wg) * (x @ Wu)` (`fuse-swiglu`, `glu`). W is a constant
    /// K x Nw f32 matrix (inputs A, W, optional bias [Nw]) or, with `nbits`, a MatMulNBits weight
    /// (inputs A, B, scales, optional zero points, optional bias, laid out as MatMulNBits').
    /// With `glu`, W holds the gate columns then the up columns (Nw = 2N) and the output is
    /// `act(A @ W[:, :N]) * (A @ W[:, N:])`, [..., N]; otherwise `act(A @ W + bias)`, [..., Nw].
    MatMulAct {
        act: Act,
        glu: bool,
        nbits: Option<NBitsAttrs>,
    },
    /// A tree of f32 elementwise ops computed in one loop (`fuse-elementwise`): step i applies
    /// its op (Unary, or Binary Add/Sub/Mul/Div) to node inputs and earlier steps; the output is
    /// the last step, shaped like the broadcast of the inputs.
    Elementwise {
        steps: Vec<ElemStep>,
    },
}

/// One op of a fused elementwise tree.
#[derive(Clone, Debug, PartialEq)]
pub struct ElemStep {
    pub op: Op,
    pub args: Vec<ElemArg>,
}

/// An operand of an `ElemStep`: node input i, or the result of step i.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ElemArg {
    In(usize),
    Step(usize),
}

impl ElemStep {
    /// The tree rooted at step `i` as text, e.g. `Add(Mul(i0,i1),i2)`.
    pub fn render(steps: &[ElemStep], i: usize) -> String {
        let args: Vec<String> = steps[i]
            .args
            .iter()
            .map(|a| match a {
                ElemArg::In(k) => format!("i{k}"),
                ElemArg::Step(j) => ElemStep::render(steps, *j),
            })
            .collect();
        format!("{}({})", steps[i].op.name(), args.join(","))
    }
}

/// The MatMulNBits attributes of a fused matmul's quantized weight.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NBitsAttrs {
    pub k: usize,
    pub n: usize,
    pub bits: usize,
    pub block_size: usize,
    pub accuracy_level: i64,
    /// A static activation scale (MatMulNBits' `act`).
    pub act: Option<super::nbits::ActQuant>,
}

/// The activation a fused matmul applies to each output element.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Act {
    None,
    Relu,
    /// `0.5 x (1 + erf(x / sqrt 2))`.
    Gelu,
    /// `0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))` (GPT-2's gelu_new).
    GeluTanh,
    Sigmoid,
    /// `x * sigmoid(x)`.
    Silu,
    Tanh,
}

impl Act {
    pub fn name(self) -> &'static str {
        match self {
            Act::None => "none",
            Act::Relu => "relu",
            Act::Gelu => "gelu",
            Act::GeluTanh => "gelu_tanh",
            Act::Sigmoid => "sigmoid",
            Act::Silu => "silu",
            Act::Tanh => "tanh",
        }
    }

    /// The activation in f64 (the interpreter's reference).
    pub fn apply(self, x: f64) -> f64 {
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        match self {
            Act::None => x,
            Act::Relu => x.max(0.0),
            Act::Gelu => 0.5 * x * (1.0 + crate::interp::math::erf(x / std::f64::consts::SQRT_2)),
            Act::GeluTanh => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
            }
            Act::Sigmoid => sig(x),
            Act::Silu => x * sig(x),
            Act::Tanh => x.tanh(),
        }
    }
}

impl NBitsAttrs {
    /// The plain MatMulNBits with these attributes (the inverse of `Op::nbits`).
    pub fn matmul_nbits(self) -> Op {
        let NBitsAttrs { k, n, bits, block_size, accuracy_level, act } = self;
        Op::MatMulNBits { k, n, bits, block_size, accuracy_level, act }
    }

    /// Activations rounded to int8: per row and block (accuracy level 4) or with a static scale.
    pub fn int8_activations(&self) -> bool {
        self.accuracy_level == 4 || self.act.is_some()
    }

    /// The text form's `key=value` list (accuracy level and static scale only when set).
    pub fn attrs(&self) -> Vec<String> {
        let mut a = vec![
            format!("K={}", self.k),
            format!("N={}", self.n),
            format!("bits={}", self.bits),
            format!("block_size={}", self.block_size),
        ];
        if self.accuracy_level != 0 {
            a.push(format!("accuracy_level={}", self.accuracy_level));
        }
        if let Some(q) = &self.act {
            a.extend([
                format!("act_scale={}", q.scale),
                format!("act_zero={}", q.zero),
                format!("act_dtype={}", q.dtype),
            ]);
        }
        a
    }
}

impl Op {
    /// The quantized-weight attributes of MatMulNBits or a fused MatMulAct over one, and whether
    /// it is a SwiGLU (`glu`) one.
    pub fn nbits(&self) -> Option<(NBitsAttrs, bool)> {
        match *self {
            Op::MatMulNBits { k, n, bits, block_size, accuracy_level, act } => {
                Some((NBitsAttrs { k, n, bits, block_size, accuracy_level, act }, false))
            }
            Op::MatMulAct { nbits: Some(q), glu, .. } => Some((q, glu)),
            _ => None,
        }
    }

    /// The input slot of a fused matmul's bias.
    pub fn matmul_act_bias_slot(&self) -> Option<usize> {
        match self {
            Op::MatMulAct { nbits: Some(_), .. } => Some(4),
            Op::MatMulAct { nbits: None, .. } => Some(2),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum UnaryOp {
    Neg,
    Abs,
    Sqrt,
    Reciprocal,
    Exp,
    Log,
    Erf,
    Tanh,
    Sigmoid,
    Relu,
    Not,
    IsNaN,
    IsInf { detect_negative: bool, detect_positive: bool },
    Floor,
    Ceil,
    Round,
    Sign,
    Sin,
    Cos,
    Softplus,
    HardSwish,
    LeakyRelu { alpha: f32 },
    Elu { alpha: f32 },
    HardSigmoid { alpha: f32, beta: f32 },
    Gelu { tanh_approx: bool },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Mod { fmod: bool },
    Equal,
    Less,
    LessOrEqual,
    Greater,
    GreaterOrEqual,
    And,
    Or,
    Xor,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VariadicOp {
    Min,
    Max,
    Sum,
    Mean,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceKind {
    Mean,
    Sum,
    Max,
    Min,
    Prod,
    L2,
    SumSquare,
}

impl BinaryOp {
    pub fn is_comparison(self) -> bool {
        use BinaryOp::*;
        matches!(self, Equal | Less | LessOrEqual | Greater | GreaterOrEqual)
    }
    pub fn is_logical(self) -> bool {
        matches!(self, BinaryOp::And | BinaryOp::Or | BinaryOp::Xor)
    }
}

impl UnaryOp {
    pub fn name(&self) -> &'static str {
        use UnaryOp::*;
        match self {
            Neg => "Neg",
            Abs => "Abs",
            Sqrt => "Sqrt",
            Reciprocal => "Reciprocal",
            Exp => "Exp",
            Log => "Log",
            Erf => "Erf",
            Tanh => "Tanh",
            Sigmoid => "Sigmoid",
            Relu => "Relu",
            Not => "Not",
            IsNaN => "IsNaN",
            IsInf { .. } => "IsInf",
            Floor => "Floor",
            Ceil => "Ceil",
            Round => "Round",
            Sign => "Sign",
            Sin => "Sin",
            Cos => "Cos",
            Softplus => "Softplus",
            HardSwish => "HardSwish",
            LeakyRelu { .. } => "LeakyRelu",
            Elu { .. } => "Elu",
            HardSigmoid { .. } => "HardSigmoid",
            Gelu { .. } => "Gelu",
        }
    }
}

impl Op {
    /// The operation's name in the IR text form (the ONNX op type where one exists).
    pub fn name(&self) -> &'static str {
        use Op::*;
        match self {
            Input { .. } => "Input",
            Const { .. } => "Const",
            Unary(u) => u.name(),
            Binary(b) => match b {
                BinaryOp::Add => "Add",
                BinaryOp::Sub => "Sub",
                BinaryOp::Mul => "Mul",
                BinaryOp::Div => "Div",
                BinaryOp::Pow => "Pow",
                BinaryOp::Mod { .. } => "Mod",
                BinaryOp::Equal => "Equal",
                BinaryOp::Less => "Less",
                BinaryOp::LessOrEqual => "LessOrEqual",
                BinaryOp::Greater => "Greater",
                BinaryOp::GreaterOrEqual => "GreaterOrEqual",
                BinaryOp::And => "And",
                BinaryOp::Or => "Or",
                BinaryOp::Xor => "Xor",
            },
            Variadic(v) => match v {
                VariadicOp::Min => "Min",
                VariadicOp::Max => "Max",
                VariadicOp::Sum => "Sum",
                VariadicOp::Mean => "Mean",
            },
            Where => "Where",
            Clip => "Clip",
            Cast { .. } => "Cast",
            CastLike => "CastLike",
            Identity => "Identity",
            Dropout => "Dropout",
            MatMul => "MatMul",
            MatMulInteger => "MatMulInteger",
            Gemm { .. } => "Gemm",
            Softmax { .. } => "Softmax",
            LogSoftmax { .. } => "LogSoftmax",
            LayerNorm { .. } => "LayerNormalization",
            Reduce { kind, .. } => match kind {
                ReduceKind::Mean => "ReduceMean",
                ReduceKind::Sum => "ReduceSum",
                ReduceKind::Max => "ReduceMax",
                ReduceKind::Min => "ReduceMin",
                ReduceKind::Prod => "ReduceProd",
                ReduceKind::L2 => "ReduceL2",
                ReduceKind::SumSquare => "ReduceSumSquare",
            },
            ArgReduce { max: true, .. } => "ArgMax",
            ArgReduce { max: false, .. } => "ArgMin",
            Transpose { .. } => "Transpose",
            Reshape { .. } => "Reshape",
            Flatten { .. } => "Flatten",
            Squeeze => "Squeeze",
            Unsqueeze => "Unsqueeze",
            Concat { .. } => "Concat",
            Split { .. } => "Split",
            Slice => "Slice",
            Expand => "Expand",
            Tile => "Tile",
            Shape { .. } => "Shape",
            Size => "Size",
            ConstantOfShape { .. } => "ConstantOfShape",
            Range => "Range",
            Gather { .. } => "Gather",
            GatherElements { .. } => "GatherElements",
            GatherND { .. } => "GatherND",
            Trilu { .. } => "Trilu",
            CumSum { .. } => "CumSum",
            QuantizeLinear { .. } => "QuantizeLinear",
            DequantizeLinear { .. } => "DequantizeLinear",
            DynamicQuantizeLinear => "DynamicQuantizeLinear",
            RmsNorm { .. } => "RMSNormalization",
            Attention { .. } => "Attention",
            MatMulNBits { .. } => "MatMulNBits",
            MatMulAct { .. } => "MatMulAct",
            Elementwise { .. } => "Elementwise",
        }
    }

    /// Attributes as `key=value` strings for the text form; defaults are shown too,
    /// so a printed line says everything the op does.
    pub fn attrs(&self) -> Vec<String> {
        use Op::*;
        fn list(v: &[i64]) -> String {
            let items: Vec<String> = v.iter().map(|x| x.to_string()).collect();
            format!("[{}]", items.join(","))
        }
        match self {
            Input { index } => vec![format!("index={index}")],
            Const { .. } => vec![],
            Unary(u) => match u {
                UnaryOp::IsInf { detect_negative, detect_positive } => {
                    vec![format!("detect_negative={detect_negative}"), format!("detect_positive={detect_positive}")]
                }
                UnaryOp::LeakyRelu { alpha } | UnaryOp::Elu { alpha } => vec![format!("alpha={alpha}")],
                UnaryOp::HardSigmoid { alpha, beta } => {
                    vec![format!("alpha={alpha}"), format!("beta={beta}")]
                }
                UnaryOp::Gelu { tanh_approx } => {
                    vec![format!("approximate={}", if *tanh_approx { "tanh" } else { "none" })]
                }
                _ => vec![],
            },
            Binary(BinaryOp::Mod { fmod }) => vec![format!("fmod={fmod}")],
            Cast { to } => vec![format!("to={to}")],
            Gemm { alpha, beta, trans_a, trans_b } => vec![
                format!("alpha={alpha}"),
                format!("beta={beta}"),
                format!("trans_a={trans_a}"),
                format!("trans_b={trans_b}"),
            ],
            Softmax { axis }
            | LogSoftmax { axis }
            | Concat { axis }
            | Gather { axis }
            | GatherElements { axis }
            | Flatten { axis } => vec![format!("axis={axis}")],
            LayerNorm { axis, epsilon } | RmsNorm { axis, epsilon } => {
                vec![format!("axis={axis}"), format!("epsilon={epsilon:e}")]
            }
            Attention { scale } => vec![format!("scale={scale}")],
            Reduce { axes, keepdims, noop_with_empty_axes, .. } => {
                let mut a = Vec::new();
                if let Some(axes) = axes {
                    a.push(format!("axes={}", list(axes)));
                }
                a.push(format!("keepdims={keepdims}"));
                if *noop_with_empty_axes {
                    a.push("noop_with_empty_axes=true".into());
                }
                a
            }
            ArgReduce { axis, keepdims, select_last_index, .. } => vec![
                format!("axis={axis}"),
                format!("keepdims={keepdims}"),
                format!("select_last_index={select_last_index}"),
            ],
            Transpose { perm } => perm.iter().map(|p| format!("perm={}", list(p))).collect(),
            Reshape { allowzero } => {
                if *allowzero {
                    vec!["allowzero=true".into()]
                } else {
                    vec![]
                }
            }
            Split { axis, num_outputs } => {
                let mut a = vec![format!("axis={axis}")];
                if let Some(n) = num_outputs {
                    a.push(format!("num_outputs={n}"));
                }
                a
            }
            Shape { start, end } => {
                let mut a = Vec::new();
                if *start != 0 {
                    a.push(format!("start={start}"));
                }
                if let Some(e) = end {
                    a.push(format!("end={e}"));
                }
                a
            }
            ConstantOfShape { value } => vec![format!("value={value:?}")],
            GatherND { batch_dims } => vec![format!("batch_dims={batch_dims}")],
            Trilu { upper } => vec![format!("upper={upper}")],
            CumSum { exclusive, reverse } => {
                vec![format!("exclusive={exclusive}"), format!("reverse={reverse}")]
            }
            QuantizeLinear { axis, saturate, block_size, output_dtype } => {
                let mut a = vec![format!("axis={axis}")];
                if *block_size != 0 {
                    a.push(format!("block_size={block_size}"));
                }
                if !saturate {
                    a.push("saturate=false".into());
                }
                if let Some(d) = output_dtype {
                    a.push(format!("output_dtype={d}"));
                }
                a
            }
            DequantizeLinear { axis, block_size } => {
                let mut a = vec![format!("axis={axis}")];
                if *block_size != 0 {
                    a.push(format!("block_size={block_size}"));
                }
                a
            }
            MatMulNBits { .. } => self.nbits().map(|(q, _)| q.attrs()).unwrap_or_default(),
            Elementwise { steps } => vec![format!("expr={}", ElemStep::render(steps, steps.len().saturating_sub(1)))],
            MatMulAct { act, glu, nbits } => {
                let mut a = vec![format!("act={}", act.name())];
                if *glu {
                    a.push("glu=true".into());
                }
                if let Some(q) = nbits {
                    a.extend(q.attrs());
                }
                a
            }
            _ => vec![],
        }
    }

    /// A MatMulNBits (or fused one) whose activations are rounded to int8.
    pub fn int8_activations(&self) -> bool {
        self.nbits().is_some_and(|(q, _)| q.int8_activations())
    }

    /// How many inputs the op takes: (required, maximum).
    pub fn arity(&self) -> (usize, usize) {
        use Op::*;
        match self {
            Input { .. } | Const { .. } => (0, 0),
            Unary(_)
            | Cast { .. }
            | Identity
            | Transpose { .. }
            | Flatten { .. }
            | Shape { .. }
            | Size
            | ConstantOfShape { .. }
            | Softmax { .. }
            | LogSoftmax { .. }
            | ArgReduce { .. }
            | DynamicQuantizeLinear => (1, 1),
            Binary(_)
            | CastLike
            | MatMul
            | Reshape { .. }
            | Unsqueeze
            | Expand
            | Tile
            | Gather { .. }
            | GatherElements { .. }
            | GatherND { .. } => (2, 2),
            Variadic(_) => (1, usize::MAX),
            Concat { .. } => (1, usize::MAX),
            Where | Range => (3, 3),
            Clip => (1, 3),
            Dropout => (1, 3),
            MatMulInteger => (2, 4),
            Gemm { .. } => (2, 3),
            LayerNorm { .. } => (2, 3),
            Reduce { .. } | Squeeze | Trilu { .. } => (1, 2),
            Split { .. } => (1, 2),
            Slice => (3, 5),
            CumSum { .. } => (2, 2),
            QuantizeLinear { .. } | DequantizeLinear { .. } => (2, 3),
            RmsNorm { .. } => (2, 2),
            Attention { .. } => (3, 4),
            MatMulNBits { .. } => (3, 4),
            MatMulAct { nbits: None, .. } => (2, 3),
            MatMulAct { nbits: Some(_), .. } => (3, 5),
            Elementwise { .. } => (1, usize::MAX),
        }
    }
}

//! The pass manager and the IR-to-IR passes, one file each.
//!
//! A pipeline is a list of pass names. After every pass the graph is verified,
//! so a pass that breaks an invariant is named in the error, and an observer
//! can print the IR between passes (`edgec inspect --after PASS`).

pub mod const_fold;
pub mod cse;
pub mod dce;
pub mod fuse_attention;
pub mod fuse_elementwise;
pub mod fuse_layer_norm;
pub mod fuse_matmul_epilogue;
pub mod fuse_qkv;
pub mod fuse_rms_norm;
pub mod fuse_swiglu;
pub mod gptq;
pub mod logits_last;
pub mod pattern;
pub mod prune;
pub mod prune_structured;
pub mod qdq_activations;
pub mod qdq_weights;
pub mod quantize;
pub mod sensitive_layers;
pub mod sensitivity;
pub mod shape_infer;
pub mod smooth;

use crate::error::{Error, Result};
use crate::ir::{verify::verify, Graph};

/// What a pass did, for reports and `--print-stats`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PassStats {
    /// Nodes the pass removed, replaced or rewrote.
    pub changed: usize,
}

pub trait Pass {
    fn name(&self) -> &'static str;
    fn run(&self, g: &mut Graph) -> Result<PassStats>;
}

struct ShapeInference;
impl Pass for ShapeInference {
    fn name(&self) -> &'static str {
        "shape-inference"
    }
    fn run(&self, g: &mut Graph) -> Result<PassStats> {
        shape_infer::infer_shapes(g)?;
        Ok(PassStats::default())
    }
}

/// Every pass, by the name pipelines use.
pub fn pass_by_name(name: &str) -> Option<Box<dyn Pass>> {
    Some(match name {
        "shape-inference" => Box::new(ShapeInference),
        "const-fold" => Box::new(const_fold::ConstFold),
        "dce" => Box::new(dce::Dce),
        "cse" => Box::new(cse::Cse),
        "fuse-layer-norm" => Box::new(fuse_layer_norm::FuseLayerNorm),
        "fuse-rms-norm" => Box::new(fuse_rms_norm::FuseRmsNorm),
        "fuse-attention" => Box::new(fuse_attention::FuseAttention),
        "fuse-swiglu" => Box::new(fuse_swiglu::FuseSwiGlu),
        "fuse-matmul-epilogue" => Box::new(fuse_matmul_epilogue::FuseMatMulEpilogue),
        "fuse-qkv" => Box::new(fuse_qkv::FuseQkv),
        "fuse-elementwise" => Box::new(fuse_elementwise::FuseElementwise),
        "qdq-weights" => Box::new(qdq_weights::QdqWeights),
        "qdq-activations" => Box::new(qdq_activations::QdqActivations),
        "logits-last" => Box::new(logits_last::LogitsLast),
        _ => return None,
    })
}

pub const ALL_PASSES: &[&str] = &[
    "shape-inference",
    "qdq-weights",
    "qdq-activations",
    "const-fold",
    "dce",
    "cse",
    "fuse-layer-norm",
    "fuse-rms-norm",
    "fuse-attention",
    "fuse-swiglu",
    "fuse-matmul-epilogue",
    "fuse-qkv",
    "fuse-elementwise",
    "logits-last",
];

/// The pipeline `edgec` runs by default.
/// Import already ran shape inference, and const-fold re-infers what it needs, so
/// the default pipeline does not start with another full shape-inference run.
/// The fusions run on the cleaned-up graph (LayerNorm before RMSNorm: a LayerNorm contains an
/// RMSNorm of `x - mean`) and remove what they replaced themselves. SwiGLU before the epilogue
/// fusion (its gate would otherwise become a MatMul with a SiLU epilogue) and both before the
/// q/k/v merge (which would otherwise merge gate and up); elementwise chains last (they would
/// otherwise take the activations the matmul epilogues absorb).
pub const DEFAULT_PIPELINE: &[&str] = &[
    "qdq-weights",
    "qdq-activations",
    "const-fold",
    "cse",
    "dce",
    "fuse-layer-norm",
    "fuse-rms-norm",
    "fuse-attention",
    "fuse-swiglu",
    "fuse-matmul-epilogue",
    "fuse-qkv",
    "fuse-elementwise",
];

/// The fusions that rewrite matmuls, and the elementwise one that must follow them. Weight
/// quantization (`--quantize`, its calibration and its per-layer rules, which name MatMul nodes
/// and weights) runs before them: they then fuse the quantized MatMulNBits.
pub const MATMUL_FUSIONS: &[&str] = &["fuse-swiglu", "fuse-matmul-epilogue", "fuse-qkv", "fuse-elementwise"];

/// Passes that also run after weight quantization when a pipeline names them: `logits-last`
/// (`--logits last`) slices the lm_head's input, which the calibration run behind `--quantize`
/// must still see at every position.
pub const AFTER_QUANTIZE: &[&str] = &["logits-last"];

/// A pipeline's pass names split into those before weight quantization and those after it (the
/// matmul fusions and `AFTER_QUANTIZE`), each in pipeline order.
pub fn split_at_quantize<'a>(names: &[&'a str]) -> (Vec<&'a str>, Vec<&'a str>) {
    names.iter().partition(|n| !MATMUL_FUSIONS.contains(n) && !AFTER_QUANTIZE.contains(n))
}

pub struct PassManager {
    passes: Vec<Box<dyn Pass>>,
}

impl PassManager {
    /// A pipeline from a comma-separated list; `default` names the default pipeline.
    pub fn parse(list: &str) -> Result<PassManager> {
        let mut passes = Vec::new();
        for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if name == "default" {
                passes.extend(DEFAULT_PIPELINE.iter().map(|n| pass_by_name(n).expect("known pass")));
                continue;
            }
            let p = pass_by_name(name).ok_or_else(|| {
                Error::invalid(format!("unknown pass '{name}' (passes: default, {})", ALL_PASSES.join(", ")))
            })?;
            passes.push(p);
        }
        Ok(PassManager { passes })
    }

    pub fn default_pipeline() -> PassManager {
        PassManager::parse("default").expect("the default pipeline parses")
    }

    /// The default pipeline split where `--quantize` goes: the passes before weight quantization,
    /// and the matmul fusions after it.
    pub fn default_around_quantize() -> (PassManager, PassManager) {
        let (pre, post) = split_at_quantize(DEFAULT_PIPELINE);
        (PassManager::parse(&pre.join(",")).expect("parses"), PassManager::parse(&post.join(",")).expect("parses"))
    }

    /// Appends a configured pass (one that `pass_by_name` cannot build, e.g. `quantize`).
    pub fn push(&mut self, p: Box<dyn Pass>) {
        self.passes.push(p);
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.passes.iter().map(|p| p.name()).collect()
    }

    /// Runs every pass in order, verifying after each and calling `observe`
    /// with the pass name and the graph it produced.
    pub fn run(
        &self,
        g: &mut Graph,
        observe: &mut dyn FnMut(&str, &PassStats, &Graph),
    ) -> Result<Vec<(&'static str, PassStats)>> {
        let mut report = Vec::new();
        for p in &self.passes {
            let stats = p.run(g)?;
            verify(g).map_err(|e| Error::invalid(format!("the graph is invalid after pass '{}': {e}", p.name())))?;
            observe(p.name(), &stats, g);
            report.push((p.name(), stats));
        }
        Ok(report)
    }
}

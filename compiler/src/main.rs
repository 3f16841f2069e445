//! The `edgec` command line.

use clap::{Parser, Subcommand};
use edgec::interp::Interpreter;
use edgec::ir::text::render;
use edgec::passes::PassManager;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser)]
#[command(name = "edgec", version, about = "Ahead-of-time compiler for transformer models on edge devices")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once
enum Command {
    /// Print a model's IR (after import and shape inference, or after passes).
    Inspect {
        /// The ONNX model (external-data files are read from its folder).
        model: PathBuf,
        /// Comma-separated pass pipeline to run first, e.g. `default` or
        /// `shape-inference,const-fold,dce`. Without it, the IR as imported.
        #[arg(long)]
        passes: Option<String>,
        /// Print the IR after this pass of the pipeline (repeatable; `all` prints
        /// after every pass). Without it, only the final IR is printed.
        #[arg(long)]
        after: Vec<String>,
    },
    /// Compile an ONNX model to native code: a `.edgec` artifact (or an ELF object + C header).
    Compile {
        /// The ONNX model.
        model: PathBuf,
        /// `host`, `x86_64`, `aarch64`, `riscv64` or a target triple.
        #[arg(long, default_value = "host")]
        target: String,
        /// CPU preset (`native`, `x86-64-v2`, `x86-64-v3`, `cortex-a53`, `cortex-a76`, `rv64gcv`, ...).
        #[arg(long)]
        cpu: Option<String>,
        /// Extra CPU features, e.g. `+avx2,+fma` or `+dotprod` (default: the architecture's baseline).
        #[arg(long)]
        features: Option<String>,
        /// Bound for symbolic dims such as the sequence length; the arena is sized for it.
        #[arg(long, default_value_t = edgec::codegen::DEFAULT_MAX_SEQ)]
        max_seq: u64,
        /// Bound for batch-like symbolic dims (names containing "batch").
        #[arg(long, default_value_t = 1)]
        max_batch: u64,
        /// Bound for one symbol, NAME=N (repeatable; overrides --max-seq/--max-batch).
        #[arg(long = "bound", value_name = "NAME=N")]
        bounds: Vec<String>,
        /// Pass pipeline to run before code generation.
        #[arg(long, default_value = "default")]
        passes: String,
        /// Which positions of a causal LM's `logits` output to compute: `all` (what `edgec eval`
        /// needs for perplexity) or `last` (generation reads only the last row: the lm_head then
        /// runs on one row instead of the whole prompt; `logits` becomes [batch, 1, vocab]).
        #[arg(long, value_name = "all|last", default_value = "all", value_parser = ["all", "last"])]
        logits: String,
        /// Output file (default: the model's name with .edgec, or .o for --emit obj).
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
        /// `artifact` (.edgec) or `obj` (ELF object + C header for static linking).
        #[arg(long, default_value = "artifact")]
        emit: String,
        /// With --emit obj: put the weights in a sidecar file instead of the object.
        #[arg(long)]
        weights_file: bool,
        /// With --emit obj: prefix of the C symbols (`PREFIX_run`, ...).
        #[arg(long, default_value = "model")]
        prefix: String,
        /// A Hugging Face tokenizer.json to store in the artifact (default: tokenizer.json beside
        /// the model, when there is one); `none` stores none.
        #[arg(long)]
        tokenizer: Option<String>,
        /// Also write OUTPUT.symbols: each generated function's offset, size and node name (for
        /// profiling: run with EDGEC_PERF_MAP=OUTPUT.symbols under `perf record`).
        #[arg(long)]
        symbols: bool,
        /// Also write OUTPUT.listing: every generated function's machine instructions as Cranelift
        /// prints them (for reading kernels; `benches/tile_loops.sh` counts their loops).
        #[arg(long)]
        listing: bool,
        /// When pruned f32 matmul weights are stored block-sparse for the sparse kernel: `auto`
        /// (when that takes at most 0.8 of the dense bytes, where it measured faster: about 80 %
        /// unstructured sparsity; 2:4 stays dense), `off`, `always` (whenever some four-column row is
        /// all zero).
        #[arg(long, default_value = "auto", value_name = "auto|off|always")]
        sparse: edgec::codegen::plan::SparseMode,
        #[command(flatten)]
        optimize: OptimizeArgs,
        #[command(flatten)]
        prune: PruneArgs,
    },
    /// Run a model (.onnx with the reference interpreter, .edgec natively); writes NAME.npy per output.
    Run {
        /// The ONNX model or compiled .edgec artifact.
        model: PathBuf,
        /// An input as NAME=FILE.npy (repeat for each graph input).
        #[arg(long = "input", short = 'i', value_name = "NAME=FILE.npy")]
        inputs: Vec<String>,
        /// Folder for the output .npy files (created if missing).
        #[arg(long, default_value = ".")]
        output_dir: PathBuf,
        /// Pass pipeline to run before interpreting (`none` runs the graph as imported).
        #[arg(long, default_value = "default")]
        passes: String,
        /// Threads for a compiled model (default: every CPU).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Generate text with a compiled language model (its artifact must carry a tokenizer).
    Generate {
        model: PathBuf,
        #[arg(long, short = 'p')]
        prompt: String,
        /// Wrap the prompt in the ChatML chat template (instruct models).
        #[arg(long)]
        chat: bool,
        /// System message for --chat.
        #[arg(long)]
        system: Option<String>,
        /// Maximum number of new tokens.
        #[arg(short = 'n', long, default_value_t = 128)]
        max_tokens: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 1.0)]
        repetition_penalty: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        threads: Option<usize>,
        /// Keep generating past end-of-text tokens (for benchmarks: always -n tokens).
        #[arg(long)]
        ignore_eos: bool,
    },
    /// Perplexity of a compiled language model on a text file (non-overlapping windows of --ctx
    /// tokens, each from an empty context).
    Eval {
        model: PathBuf,
        #[arg(long)]
        text: PathBuf,
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// Stop after this many windows (0 = the whole text).
        #[arg(long, default_value_t = 0)]
        max_windows: usize,
        #[arg(long)]
        threads: Option<usize>,
        /// Also report mean KL divergence (reference || model) and top-1 agreement against this
        /// artifact (e.g. the fp32 build), on the same windows.
        #[arg(long, value_name = "OTHER.edgec")]
        reference: Option<PathBuf>,
    },
    /// Time a compiled .edgec artifact: median latency over N runs.
    Bench {
        model: PathBuf,
        #[arg(long = "input", short = 'i', value_name = "NAME=FILE.npy")]
        inputs: Vec<String>,
        #[arg(long, default_value_t = 20)]
        runs: usize,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Threads (default: every CPU).
        #[arg(long)]
        threads: Option<usize>,
    },
}

/// Pruning and calibration options of `compile`.
#[derive(clap::Args, Default)]
struct PruneArgs {
    /// Prune linear layers: `unstructured:F`, `N:M` (e.g. `2:4`), `structured:F`; append
    /// `:recover` (or pass --recover) for least-squares recovery on the calibration text.
    #[arg(long, value_name = "SPEC")]
    prune: Option<String>,
    /// Recover pruned layers (layer by layer, on the pruned model's own activations).
    #[arg(long)]
    recover: bool,
    /// Calibration text (tokenized with the model's tokenizer.json); needed by structured pruning
    /// and recovery. Alone, it collects and reports activation statistics.
    #[arg(long, value_name = "FILE")]
    calibrate: Option<PathBuf>,
    /// Calibration tokens (spread over the text as sequences of --calib-seq).
    #[arg(long, default_value_t = 1024)]
    calib_tokens: usize,
    /// Calibration sequence length.
    #[arg(long, default_value_t = 512)]
    calib_seq: usize,
}

/// Calibration and pruning between the pass pipeline and code generation.
/// The calibration token sequences of `--calibrate FILE`, if given.
fn calibration_sequences(args: &PruneArgs, tokenizer: Option<&[u8]>) -> Result<Option<Vec<Vec<u32>>>, String> {
    let Some(path) = &args.calibrate else { return Ok(None) };
    let text = std::fs::read_to_string(path).map_err(|e| format!("--calibrate {}: {e}", path.display()))?;
    let tok = tokenizer.ok_or("--calibrate needs a tokenizer (--tokenizer FILE or tokenizer.json beside the model)")?;
    edgec::calib::token_sequences(tok, &text, args.calib_tokens, args.calib_seq).map(Some).map_err(|e| e.to_string())
}

/// `timing_only`: without --prune, --calibrate alone collects the statistics and reports the time
/// (false when another step, GPTQ, uses the calibration text).
fn prune_step(
    g: &mut edgec::ir::Graph,
    args: &PruneArgs,
    tokenizer: Option<&[u8]>,
    timing_only: bool,
) -> Result<Option<edgec::passes::prune::PruneReport>, String> {
    if args.prune.is_none() && !timing_only {
        return Ok(None);
    }
    let seqs = calibration_sequences(args, tokenizer)?;
    let Some(text) = &args.prune else {
        if args.recover {
            return Err("--recover needs --prune".into());
        }
        if let Some(seqs) = &seqs {
            let cal = edgec::calib::Calibration::collect(g, seqs, &Default::default()).map_err(|e| e.to_string())?;
            println!("calibrate   {} tokens, {} linear-layer inputs, {:.1} s", cal.tokens, cal.gram.len(), cal.seconds);
        }
        return Ok(None);
    };
    let mut spec = edgec::passes::prune::PruneSpec::parse(text).map_err(|e| e.to_string())?;
    if args.recover && spec.recover == edgec::passes::prune::Recover::None {
        spec.recover = edgec::passes::prune::Recover::Sequential;
    }
    let report = edgec::passes::prune::prune(g, &spec, text, seqs.as_deref()).map_err(|e| e.to_string())?;
    print!("{}", report.summary());
    edgec::ir::verify::verify(g).map_err(|e| format!("the graph is invalid after pruning: {e}"))?;
    Ok(Some(report))
}

/// The optimisation flags of `edgec compile`.
#[derive(clap::Args, Clone, Debug, Default)]
struct OptimizeArgs {
    /// Weight quantization: `int8` (per channel), `int4` (group 32, symmetric), `int4:g128`,
    /// `int4:g32:asym`, ... Large embedding tables become int8 rows.
    #[arg(long, value_name = "SCHEME")]
    quantize: Option<String>,
    /// How weights are rounded: `absmax` (each block's full range; the default), `mse` (per
    /// block, the clipping range with the least squared weight error: measured worse on SmolLM2) or
    /// `gptq` (error-minimising rounding against the layer outputs on `--calibrate FILE`;
    /// the inputs with the largest activations first, H damped by 0.1 of its mean diagonal;
    /// `gptq:damp=F` sets the damping, `gptq:row-order` rounds in storage order as the paper).
    #[arg(long, default_value = "absmax")]
    method: String,
    /// Leave matching weights in f32: a node or weight name substring, or a pattern with `*`
    /// (repeatable), e.g. `lm_head` or `/model/layers.0/*`. Same as `--keep PATTERN=fp32`.
    #[arg(long = "keep-fp32", value_name = "PATTERN")]
    keep_fp32: Vec<String>,
    /// Give matching weights another precision than --quantize's: PATTERN=fp32 or PATTERN=SCHEME
    /// (repeatable; the first matching rule wins, --keep-fp32 rules first), e.g. `lm_head=int8`,
    /// `layers.0.=int8`. Embedding tables are int8 rows unless kept in fp32. Under w4a8, keep
    /// layers at `w8a8`: plain `int8` layers run the slower weight-only kernel.
    #[arg(long = "keep", value_name = "PATTERN=PRECISION")]
    keep: Vec<String>,
    /// Keep the layers 4-bit rounding hurts most at PRECISION (default int8; w8a8 under schemes
    /// with int8 activations), found from the graph without calibration: the linear layers
    /// outside the numbered blocks (lm_head), the first and last block, and every value
    /// projection. After --keep's rules (those win). `--keep-sensitive=fp32` leaves them in f32.
    #[arg(
        long = "keep-sensitive",
        value_name = "PRECISION",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "auto"
    )]
    keep_sensitive: Option<String>,
    /// Keep the linear layers most sensitive to --quantize's rounding (relative output error on
    /// the --calibrate text) at PRECISION (default int8): the top N (`N`), or in rank order those
    /// whose extra bytes fit a budget (`2MB`, `500KB`); `BUDGET=PRECISION` for another precision.
    /// The ranking goes to --report.
    #[arg(long = "auto-keep", value_name = "BUDGET[=PRECISION]")]
    auto_keep: Option<String>,
    /// Static int8 activations for the layers with int8 activations (w8a8, w4a8, `:a8`): one scale
    /// per layer input from the --calibrate run instead of one per row and block at run time.
    /// `minmax` (max |x| / 127), `minmax:asym` (uint8, min..max with a zero point),
    /// `percentile[:P]` (the P-th percentile of |x| / 127, default 99.99).
    #[arg(long = "act-static", value_name = "METHOD")]
    act_static: Option<String>,
    /// Scale each linear layer's input channels before quantizing, the division folded into the
    /// preceding norm or up projection (exact in f32; from the --calibrate run). `ALPHA` (alone:
    /// 0.5) is SmoothQuant, `max|x|^α / max|w|^(1-α)`: it evens out activation outliers so one
    /// static activation scale per tensor fits (`--act-static`). `awq` scales by `rms(x)^α` with
    /// α chosen per input for the least estimated output error of the rounded weights, and then
    /// clips each weight block to the range with the least activation-weighted rounding error
    /// (activation-aware weight quantization; GPTQ, when asked for, does the rounding instead).
    #[arg(long, value_name = "ALPHA|awq", num_args = 0..=1, default_missing_value = "0.5")]
    smooth: Option<String>,
    /// Write per-pass statistics (ops, weight bytes, time) and the code generator's sizes as JSON.
    #[arg(long, value_name = "FILE.json")]
    report: Option<PathBuf>,
}

impl OptimizeArgs {
    /// The quantize pass the flags ask for (no GPTQ rounder, no automatic rules yet).
    fn quantize_pass(&self) -> Result<Option<edgec::passes::quantize::Quantize>, String> {
        use edgec::passes::quantize::{Quantize, Rule, Scheme};
        let Some(q) = &self.quantize else {
            if self.act_static.is_some() {
                return Err("--act-static needs --quantize with int8 activations (w8a8, w4a8, SCHEME:a8)".into());
            }
            if self.smooth.is_some() {
                return Err("--smooth needs --quantize".into());
            }
            return match (self.method.as_str(), &self.auto_keep, self.keep.is_empty()) {
                (m, _, _) if m.starts_with("gptq") => Err("--method gptq needs --quantize".into()),
                (_, Some(_), _) => Err("--auto-keep needs --quantize".into()),
                (_, _, false) => Err("--keep needs --quantize".into()),
                _ if self.keep_sensitive.is_some() => Err("--keep-sensitive needs --quantize".into()),
                _ => Ok(None),
            };
        };
        let scheme: Scheme = q.parse().map_err(|e| format!("--quantize: {e}"))?;
        self.smooth_alpha()?;
        if self.act_static()?.is_some() && !scheme.a8 {
            return Err(format!(
                "--act-static needs int8 activations, which --quantize {q} does not have (w8a8, w4a8, SCHEME:a8)"
            ));
        }
        self.keep_sensitive(scheme)?;
        let mut pass = Quantize::new(scheme, self.keep_fp32.clone());
        for k in &self.keep {
            pass.rules.push(k.parse::<Rule>().map_err(|e| format!("--keep {e}"))?);
        }
        pass.search = match self.method.as_str() {
            "mse" => true,
            "absmax" => false,
            m if m.starts_with("gptq") => {
                self.gptq()?;
                false
            }
            m => {
                return Err(format!("--method {m}: expected `absmax`, `mse` or `gptq[:damp=F][:act-order|:row-order]`"))
            }
        };
        Ok(Some(pass))
    }

    /// `--auto-keep BUDGET[=PRECISION]`: how many layers or extra bytes, at which precision (`None`: f32).
    #[allow(clippy::type_complexity)]
    fn auto_keep(
        &self,
    ) -> Result<Option<(edgec::passes::sensitivity::Budget, Option<edgec::passes::quantize::Scheme>)>, String> {
        let Some(text) = &self.auto_keep else { return Ok(None) };
        let (budget, prec) = text.split_once('=').unwrap_or((text, "int8"));
        let budget = budget.parse().map_err(|e| format!("--auto-keep {e}"))?;
        let prec = edgec::passes::quantize::parse_precision(prec).map_err(|e| format!("--auto-keep {text}: {e}"))?;
        Ok(Some((budget, prec)))
    }

    /// `--keep-sensitive[=PRECISION]`: `None` without the flag, else the precision (`None`: f32).
    /// Without a precision: int8 weights, with int8 activations when the main scheme has them
    /// (`w8a8` under `w4a8`: the integer-dot kernel instead of the slower weight-only one).
    #[allow(clippy::type_complexity)]
    fn keep_sensitive(
        &self,
        main: edgec::passes::quantize::Scheme,
    ) -> Result<Option<Option<edgec::passes::quantize::Scheme>>, String> {
        let Some(text) = &self.keep_sensitive else { return Ok(None) };
        if text == "auto" {
            return Ok(Some(Some(edgec::passes::quantize::Scheme { bits: 8, group: None, asym: false, a8: main.a8 })));
        }
        edgec::passes::quantize::parse_precision(text).map(Some).map_err(|e| format!("--keep-sensitive {e}"))
    }

    /// `--method gptq[:OPTIONS]`: GPTQ's options, `None` for another method.
    fn gptq(&self) -> Result<Option<edgec::passes::gptq::GptqOptions>, String> {
        match self.method.strip_prefix("gptq") {
            Some(rest) if rest.is_empty() || rest.starts_with(':') => {
                rest.parse().map(Some).map_err(|e| format!("--method {}: {e}", self.method))
            }
            _ => Ok(None),
        }
    }

    /// `--smooth`: `Some(Some(α))` for SmoothQuant, `Some(None)` for AWQ.
    fn smooth_alpha(&self) -> Result<Option<Option<f32>>, String> {
        let Some(text) = &self.smooth else { return Ok(None) };
        if text == "awq" {
            return Ok(Some(None));
        }
        match text.parse::<f32>() {
            Ok(a) if (0.0..=1.0).contains(&a) => Ok(Some(Some(a))),
            _ => Err(format!("--smooth {text}: expected α in 0..=1 or `awq`")),
        }
    }

    fn act_static(&self) -> Result<Option<edgec::passes::quantize::ActStatic>, String> {
        self.act_static.as_deref().map(|s| s.parse().map_err(|e| format!("--act-static {e}"))).transpose()
    }

    /// Whether quantization needs the calibration statistics (GPTQ, the sensitivity scan, static
    /// activation scales, smoothing).
    fn needs_calibration(&self) -> bool {
        self.quantize.is_some()
            && (self.method.starts_with("gptq")
                || self.auto_keep.is_some()
                || self.act_static.is_some()
                || self.smooth.is_some())
    }
}

/// The quantize pass with what calibration adds: GPTQ rounding from the Gram matrices, and
/// `--auto-keep` rules from the sensitivity scan (its ranking as a report row).
fn calibrated_quantize(
    g: &mut edgec::ir::Graph,
    mut pass: edgec::passes::quantize::Quantize,
    optimize: &OptimizeArgs,
    args: &PruneArgs,
    tokenizer: Option<&[u8]>,
) -> Result<(edgec::passes::quantize::Quantize, Option<String>), String> {
    use edgec::passes::sensitivity;
    let auto_keep = optimize.auto_keep()?;
    let gptq = optimize.gptq()?;
    let act_static = optimize.act_static()?;
    let smooth = optimize.smooth_alpha()?;
    let flag = match (gptq, act_static, smooth) {
        (Some(_), _, _) => "--method gptq",
        (_, Some(_), _) => "--act-static",
        (_, _, Some(_)) => "--smooth",
        _ => "--auto-keep",
    };
    let seqs = calibration_sequences(args, tokenizer)?.ok_or_else(|| format!("{flag} needs --calibrate FILE"))?;
    if let Some(alpha) = smooth {
        // Smooth on one run's statistics; the statistics below come from the smoothed graph.
        use edgec::passes::smooth::{smooth, Strength};
        let t = Instant::now();
        let opts = edgec::calib::Options { channel_stats: alpha.is_some(), ..Default::default() };
        let cal = edgec::calib::Calibration::collect(g, &seqs, &opts).map_err(|e| e.to_string())?;
        let strength = alpha.map_or(Strength::Awq(&pass), Strength::Alpha);
        let r = smooth(g, &cal, &strength).map_err(|e| e.to_string())?;
        println!(
            "smooth      {}: {} inputs of {} linear layers, factors {:.3e} .. {:.3e} ({:.1} s)",
            optimize.smooth.as_deref().unwrap_or_default(),
            r.inputs,
            r.layers,
            r.min_factor,
            r.max_factor,
            t.elapsed().as_secs_f64()
        );
    }
    let g: &edgec::ir::Graph = g;
    let mut opts = edgec::calib::Options { channel_stats: act_static.is_some(), ..Default::default() };
    if let Some(p) = act_static.and_then(|a| a.percentile()) {
        opts.percentile = p;
    }
    let cal = edgec::calib::Calibration::collect(g, &seqs, &opts).map_err(|e| e.to_string())?;
    println!("calibrate   {} tokens, {} linear-layer inputs, {:.1} s", cal.tokens, cal.gram.len(), cal.seconds);
    if let Some(a) = act_static {
        pass.act_static = edgec::passes::quantize::static_scales(g, &cal, a);
        let scales: Vec<f32> = pass.act_static.values().map(|q| q.scale).collect();
        let (lo, hi) = scales.iter().fold((f32::INFINITY, 0f32), |(lo, hi), &s| (lo.min(s), hi.max(s)));
        println!("act-static  {} layers with static activation scales ({lo:.3e} .. {hi:.3e})", scales.len());
    }
    if smooth == Some(None) {
        // AWQ's second half: each block's range searched by the (smoothed) activation energies.
        pass.weigh_ranges_by(g, &cal);
    }
    let mut row = None;
    if let Some(opt) = gptq {
        let mut grams = std::collections::HashMap::new();
        for l in edgec::calib::linear_layers(g) {
            if let Some(h) = cal.gram_for(g, l.node) {
                grams.insert(g.node(l.node).name.clone(), h.h.clone());
            }
        }
        pass.rounder = Some(Box::new(move |name, w, k, n, scheme| match grams.get(name) {
            Some(h) => edgec::passes::gptq::gptq(w, k, n, h, scheme, opt).map(Some),
            None => Ok(None),
        }));
    }
    if let Some((budget, keep)) = auto_keep {
        let t = Instant::now();
        let ranking = sensitivity::scan(g, &cal, &pass).map_err(|e| e.to_string())?;
        let chosen = sensitivity::choose(&ranking, budget, keep).map_err(|e| e.to_string())?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let keep_text = keep.map_or("fp32".to_string(), |s| s.to_string());
        for (i, s) in ranking.iter().enumerate().filter(|(i, _)| chosen[*i]) {
            println!(
                "auto-keep   #{} {} ({}x{}, rel. output error {:.4}) at {keep_text}",
                i + 1,
                s.name,
                s.k,
                s.n,
                s.rel_error
            );
        }
        row = Some(sensitivity::to_json(&ranking, &chosen, pass.scheme, keep, ms));
        pass.rules.extend(sensitivity::keep_rules(&ranking, &chosen, keep));
    }
    Ok((pass, row))
}

/// Bytes of the constants that something still reads.
fn live_weight_bytes(g: &edgec::ir::Graph) -> usize {
    g.g.node_indices()
        .filter_map(|n| match g.node(n).op {
            edgec::ir::Op::Const { id } => {
                let read = g.g.edges_directed(n, petgraph::Direction::Outgoing).next().is_some()
                    || g.outputs.iter().any(|o| o.value.node == n);
                read.then(|| g.consts.get(id).map_or(0, |c| c.bytes.len()))
            }
            _ => None,
        })
        .sum()
}

fn pipeline(list: &str) -> edgec::Result<PassManager> {
    PassManager::parse(if list == "none" { "" } else { list })
}

/// A file name for an output: ONNX value names may contain '/' and ':'.
fn file_stem(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect()
}

fn inspect(model: &Path, passes: Option<String>, after: Vec<String>) -> Result<(), String> {
    let mut g = edgec::onnx::load_model(model).map_err(|e| e.to_string())?;
    let Some(list) = passes else {
        print!("{}", render(&g));
        return Ok(());
    };
    let pm = pipeline(&list).map_err(|e| e.to_string())?;
    for a in &after {
        if a != "all" && !pm.names().contains(&a.as_str()) {
            return Err(format!("--after {a}: the pipeline has no such pass ({})", pm.names().join(", ")));
        }
    }
    let mut printed_last = false;
    pm.run(&mut g, &mut |name, stats, g| {
        printed_last = after.iter().any(|a| a == "all" || a == name);
        if printed_last {
            println!("# after {name} (changed {})", stats.changed);
            print!("{}", render(g));
        }
    })
    .map_err(|e| e.to_string())?;
    if !printed_last {
        print!("{}", render(&g));
    }
    Ok(())
}

fn run(model: &Path, inputs: Vec<String>, output_dir: PathBuf, passes: String) -> Result<(), String> {
    let t0 = Instant::now();
    let mut g = edgec::onnx::load_model(model).map_err(|e| e.to_string())?;
    pipeline(&passes).and_then(|pm| pm.run(&mut g, &mut |_, _, _| {})).map_err(|e| e.to_string())?;
    let load_time = t0.elapsed();
    let feeds = read_feeds(inputs)?;
    let t1 = Instant::now();
    let interp = Interpreter::new(&g).map_err(|e| e.to_string())?;
    let outputs = interp.run(&feeds).map_err(|e| e.to_string())?;
    let run_time = t1.elapsed();
    write_outputs(&outputs, &output_dir)?;
    eprintln!(
        "load+passes {:.1} ms, interpreter {:.1} ms",
        load_time.as_secs_f64() * 1e3,
        run_time.as_secs_f64() * 1e3
    );
    Ok(())
}

fn parse_bounds(list: &[String]) -> Result<Vec<(String, u64)>, String> {
    list.iter()
        .map(|b| {
            let (n, v) = b.split_once('=').ok_or_else(|| format!("--bound '{b}' must be NAME=N"))?;
            let v = v.parse::<u64>().map_err(|_| format!("--bound '{b}': N must be a positive integer"))?;
            Ok((n.to_string(), v))
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn compile(
    model: &Path,
    opts: edgec::codegen::Options,
    passes: &str,
    logits_last: bool,
    output: Option<PathBuf>,
    emit: &str,
    weights_file: bool,
    prefix: &str,
    symbols: bool,
    tokenizer: Option<String>,
    optimize: &OptimizeArgs,
    prune: &PruneArgs,
) -> Result<(), String> {
    let tokenizer_path = match tokenizer.as_deref() {
        Some("none") => None,
        Some(p) => Some(PathBuf::from(p)),
        None => Some(model.with_file_name("tokenizer.json")).filter(|p| p.exists()),
    };
    let tokenizer_bytes = match &tokenizer_path {
        Some(p) => Some(std::fs::read(p).map_err(|e| format!("--tokenizer {}: {e}", p.display()))?),
        None => None,
    };
    let t0 = Instant::now();
    let mut g = edgec::onnx::load_model(model).map_err(|e| e.to_string())?;
    // Base pipeline, then pruning (it needs plain MatMuls), then the optimisation passes.
    // Pruning works on the unfused graph (it follows q/k/v through the attention ops), so with
    // --prune the fusion passes move after it.
    // The matmul fusions run after quantization (which names and rewrites plain MatMuls).
    let names = pipeline(passes).map_err(|e| e.to_string())?.names();
    let (names, late) = edgec::passes::split_at_quantize(&names);
    let (pre, post): (Vec<&str>, Vec<&str>) =
        names.iter().partition(|n| prune.prune.is_none() || !n.starts_with("fuse-"));
    let pm = pipeline(&pre.join(",")).map_err(|e| e.to_string())?;
    let mut opt_pm = pipeline(&post.join(",")).map_err(|e| e.to_string())?;
    let mut late_pm = pipeline(&late.join(",")).map_err(|e| e.to_string())?;
    if logits_last {
        // Last: after quantization (whose calibration needs the lm_head's input at every position)
        // and the fusions (passes/logits_last.rs).
        late_pm.push(edgec::passes::pass_by_name("logits-last").expect("logits-last exists"));
    }
    let quantize = optimize.quantize_pass()?;
    let mut rows = vec![format!(
        r#"{{"pass":"import","ops":{},"weight_bytes":{},"ms":{:.1}}}"#,
        g.op_count(),
        live_weight_bytes(&g),
        t0.elapsed().as_secs_f64() * 1e3
    )];
    let mut t_pass = Instant::now();
    let mut observe = |name: &str, stats: &edgec::passes::PassStats, g: &edgec::ir::Graph| {
        let (ops, bytes) = (g.op_count(), live_weight_bytes(g));
        if stats.changed > 0 || name == "quantize" {
            println!("pass        {name}: {} nodes changed, {ops} ops, {bytes} weight bytes", stats.changed);
        }
        rows.push(format!(
            r#"{{"pass":"{name}","changed":{},"ops":{ops},"weight_bytes":{bytes},"ms":{:.1}}}"#,
            stats.changed,
            t_pass.elapsed().as_secs_f64() * 1e3
        ));
        t_pass = Instant::now();
    };
    pm.run(&mut g, &mut observe).map_err(|e| e.to_string())?;
    let prune_report = prune_step(&mut g, prune, tokenizer_bytes.as_deref(), !optimize.needs_calibration())?;
    // The rows that explain the quantize pass's per-layer precisions, placed before its own row.
    let mut quantize_rows = Vec::new();
    if let Some(mut pass) = quantize {
        if let Some(precision) = optimize.keep_sensitive(pass.scheme)? {
            use edgec::passes::sensitive_layers as sensitive;
            let chosen = sensitive::find(&g, sensitive::SensitiveLayers::default());
            let text = precision.map_or("fp32".to_string(), |s| s.to_string());
            println!("keep        sensitive at {text}: {}", sensitive::summary(&chosen));
            pass.rules.extend(sensitive::keep_rules(&chosen, precision));
            quantize_rows.push(sensitive::to_json(&chosen, precision));
        }
        if optimize.needs_calibration() {
            // Calibrate on the graph the quantize pass will see (after pruning).
            let ranking;
            (pass, ranking) = calibrated_quantize(&mut g, pass, optimize, prune, tokenizer_bytes.as_deref())?;
            quantize_rows.extend(ranking);
        }
        opt_pm.push(Box::new(pass));
        opt_pm.push(edgec::passes::pass_by_name("dce").expect("dce exists"));
    }
    opt_pm.run(&mut g, &mut observe).map_err(|e| e.to_string())?;
    late_pm.run(&mut g, &mut observe).map_err(|e| e.to_string())?;
    if let Some(r) = prune_report {
        rows.insert(rows.len() - opt_pm.names().len() - late_pm.names().len(), r.to_json());
    }
    let at = rows.iter().position(|r| r.contains(r#""pass":"quantize""#)).unwrap_or(rows.len());
    rows.splice(at..at, quantize_rows);
    let t_import = t0.elapsed();
    // Code generation takes seconds on a real model: show how far it is.
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("codegen     [{bar:40}] {pos}/{len} functions {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let c = edgec::codegen::compile_with_progress(&g, &opts, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64 + 1);
    })
    .map_err(|e| e.to_string())?;
    bar.finish_and_clear();
    if let Some(path) = &optimize.report {
        let s = &c.stats;
        let json = format!(
            "{{\n\"model\":{:?},\n\"options\":{:?},\n\"passes\":[\n{}\n],\n\"codegen\":{{\"target\":{:?},\"nodes\":{},\"kernels\":{},\"code_bytes\":{},\"weight_bytes\":{},\"arena_bytes\":{},\"sparse_weights\":{},\"sparse_bytes\":{},\"ms\":{:.1}}}\n}}\n",
            model.display().to_string(),
            format!("{optimize:?}"),
            rows.join(",\n"),
            c.target.triple.to_string(),
            s.nodes,
            s.kernels,
            s.code_bytes,
            s.weight_bytes,
            s.arena_bytes,
            s.sparse_weights,
            s.sparse_bytes,
            s.compile_ms
        );
        std::fs::write(path, json).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    let default_ext = if emit == "obj" { "o" } else { "edgec" };
    let out = output.unwrap_or_else(|| model.with_extension(default_ext));
    let mut written = match emit {
        "artifact" => {
            let bytes = c.artifact_with_tokenizer(tokenizer_bytes.as_deref()).map_err(|e| e.to_string())?;
            std::fs::write(&out, &bytes).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
            vec![(out.clone(), bytes.len())]
        }
        "obj" => edgec::codegen::object::write(&c, &out, prefix, weights_file).map_err(|e| e.to_string())?,
        other => return Err(format!("--emit {other}: expected `artifact` or `obj`")),
    };
    // Text files beside the output: OUTPUT.symbols, OUTPUT.listing.
    use std::borrow::Cow;
    let sidecars = [
        ("symbols", symbols.then(|| Cow::Owned(c.symbol_map()))),
        ("listing", c.listing.as_deref().map(Cow::Borrowed)),
    ];
    for (ext, text) in sidecars {
        if let Some(text) = text {
            let p = PathBuf::from(format!("{}.{ext}", out.display()));
            std::fs::write(&p, text.as_bytes()).map_err(|e| format!("cannot write {}: {e}", p.display()))?;
            written.push((p, text.len()));
        }
    }
    let s = &c.stats;
    println!(
        "target      {} ({})",
        c.target.triple,
        if c.target.features == 0 { "baseline".to_string() } else { c.target.feature_text() }
    );
    println!("nodes       {} lowered to {} kernels in {} functions", s.nodes, s.kernels, s.functions);
    println!("code        {} bytes", s.code_bytes);
    println!("weights     {} bytes", s.weight_bytes);
    println!(
        "arena       {} bytes (symbols at their bounds; {} bytes without buffer reuse)",
        s.arena_bytes, s.arena_unshared
    );
    if s.sparse_weights > 0 {
        println!(
            "sparse      {} matmul weights block-sparse: {} bytes instead of {} dense",
            s.sparse_weights, s.sparse_bytes, s.sparse_dense_bytes
        );
    }
    if s.kv_slots > 0 {
        println!("kv cache    {} tensors kept in the arena ({} bytes of it)", s.kv_slots, s.kv_bytes);
    }
    for sym in &c.meta.symbols {
        println!("symbol      {} <= {}", sym.name, sym.max);
    }
    println!("time        import+passes {:.0} ms, codegen {:.0} ms", t_import.as_secs_f64() * 1e3, s.compile_ms);
    if let Some(p) = &tokenizer_path {
        println!("tokenizer   {}", p.display());
    }
    for (p, n) in written {
        println!("wrote       {} ({n} bytes)", p.display());
    }
    Ok(())
}

fn read_feeds(inputs: Vec<String>) -> Result<Vec<(String, edgec::ir::Tensor)>, String> {
    let mut feeds = Vec::new();
    for spec in inputs {
        let (name, file) = spec.split_once('=').ok_or_else(|| format!("--input '{spec}' must be NAME=FILE.npy"))?;
        feeds.push((name.to_string(), edgec::npy::read_npy(Path::new(file))?));
    }
    Ok(feeds)
}

fn is_artifact(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "edgec")
}

fn load_artifact(path: &Path, threads: Option<usize>) -> Result<edgec_runtime::Model, String> {
    let mut model = edgec_runtime::Model::load(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if let Some(t) = threads {
        if t == 0 {
            return Err("--threads must be at least 1".into());
        }
        model.set_threads(t);
    }
    Ok(model)
}

fn run_artifact(path: &Path, inputs: Vec<String>, output_dir: PathBuf, threads: Option<usize>) -> Result<(), String> {
    let t0 = Instant::now();
    let model = load_artifact(path, threads)?;
    let load_time = t0.elapsed();
    let feeds = read_feeds(inputs)?;
    let t1 = Instant::now();
    let outputs = edgec::codegen::run_model(&model, &feeds).map_err(|e| e.to_string())?;
    let run_time = t1.elapsed();
    write_outputs(&outputs, &output_dir)?;
    eprintln!("load {:.1} ms, run {:.2} ms", load_time.as_secs_f64() * 1e3, run_time.as_secs_f64() * 1e3);
    Ok(())
}

fn write_outputs(outputs: &[(String, edgec::ir::Tensor)], output_dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(output_dir).map_err(|e| format!("cannot create {}: {e}", output_dir.display()))?;
    for (name, t) in outputs {
        let path = output_dir.join(format!("{}.npy", file_stem(name)));
        edgec::npy::write_npy(&path, t)?;
        println!("{name}: {}{:?} -> {}", t.dtype(), t.shape, path.display());
    }
    Ok(())
}

fn bench(path: &Path, inputs: Vec<String>, runs: usize, warmup: usize, threads: Option<usize>) -> Result<(), String> {
    let model = load_artifact(path, threads)?;
    let feeds = read_feeds(inputs)?;
    for _ in 0..warmup {
        edgec::codegen::run_model(&model, &feeds).map_err(|e| e.to_string())?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        edgec::codegen::run_model(&model, &feeds).map_err(|e| e.to_string())?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    println!(
        "{}: median {med:.3} ms over {} runs (min {:.3} ms, max {:.3} ms), {} thread(s)",
        path.display(),
        times.len(),
        times[0],
        times[times.len() - 1],
        model.threads()
    );
    Ok(())
}

/// log-softmax of one row of logits, in f64.
fn log_probs(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
    row.iter().map(|&x| x as f64 - lse).collect()
}

fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold(0, |best, (i, &x)| if x > row[best] { i } else { best })
}

fn eval(
    path: &Path,
    text: &Path,
    ctx: usize,
    max_windows: usize,
    threads: Option<usize>,
    reference: Option<&Path>,
) -> Result<(), String> {
    if ctx < 2 {
        return Err("--ctx must be at least 2".into());
    }
    let model = load_artifact(path, threads)?;
    let other = reference.map(|p| load_artifact(p, threads)).transpose()?;
    let tok = model.tokenizer()?;
    let body = std::fs::read_to_string(text).map_err(|e| format!("{}: {e}", text.display()))?;
    let ids = tok.encode(body.as_str(), false).map_err(|e| format!("tokenizer: {e}"))?.get_ids().to_vec();
    let mut session = edgec_runtime::lm::Session::new(&model)?;
    let mut ref_session = other.as_ref().map(edgec_runtime::lm::Session::new).transpose()?;
    let (mut nll, mut count) = (0.0, 0usize);
    let (mut kl, mut agree) = (0.0, 0usize);
    let t0 = Instant::now();
    let windows: Vec<&[u32]> = ids.chunks(ctx).filter(|w| w.len() >= 2).collect();
    let n = if max_windows > 0 { windows.len().min(max_windows) } else { windows.len() };
    for (i, w) in windows.iter().take(n).enumerate() {
        session.reset()?;
        let (all, vocab) = session.feed_all(w).map_err(|e| format!("{}: {e}", path.display()))?;
        let reference_logits = match &mut ref_session {
            Some(r) => {
                r.reset()?;
                let (all, v) =
                    r.feed_all(w).map_err(|e| format!("--reference {}: {e}", reference.unwrap().display()))?;
                if v != vocab {
                    return Err(format!("--reference has a vocabulary of {v}, the model {vocab}"));
                }
                Some(all)
            }
            None => None,
        };
        for pos in 0..w.len() - 1 {
            let row = &all[pos * vocab..(pos + 1) * vocab];
            nll -= edgec_runtime::lm::log_softmax_at(row, w[pos + 1] as usize);
            if let Some(r) = &reference_logits {
                let rrow = &r[pos * vocab..(pos + 1) * vocab];
                let (lp, lq) = (log_probs(rrow), log_probs(row));
                kl += lp.iter().zip(&lq).map(|(p, q)| p.exp() * (p - q)).sum::<f64>();
                agree += (argmax(rrow) == argmax(row)) as usize;
            }
        }
        count += w.len() - 1;
        eprint!("\rwindow {}/{n}: perplexity so far {:.4}", i + 1, (nll / count as f64).exp());
    }
    eprintln!();
    println!(
        "tokens: {} ({} windows of up to {ctx}), {count} predicted, {:.1} s",
        ids.len(),
        n,
        t0.elapsed().as_secs_f64()
    );
    println!("perplexity: {:.4}", (nll / count as f64).exp());
    if let Some(r) = reference {
        println!("reference: {}", r.display());
        println!("mean KL divergence: {:.6} nats", kl / count as f64);
        println!("top-1 agreement: {:.2} % ({agree}/{count})", 100.0 * agree as f64 / count as f64);
    }
    Ok(())
}

/// The ChatML template SmolLM2, Qwen and other instruct models use.
fn chatml(system: Option<&str>, prompt: &str) -> String {
    let mut s = String::new();
    if let Some(sys) = system {
        s.push_str(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
    }
    s.push_str(&format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"));
    s
}

#[allow(clippy::too_many_arguments)]
fn generate(
    path: &Path,
    prompt: &str,
    chat: bool,
    system: Option<&str>,
    max_tokens: usize,
    sampling: &edgec_runtime::lm::Sampling,
    threads: Option<usize>,
    ignore_eos: bool,
) -> Result<(), String> {
    use std::io::Write;
    let model = load_artifact(path, threads)?;
    let tok = model.tokenizer()?;
    let text = if chat { chatml(system, prompt) } else { prompt.to_string() };
    let ids = tok.encode(text.as_str(), false).map_err(|e| format!("tokenizer: {e}"))?.get_ids().to_vec();
    if ids.is_empty() {
        return Err("the prompt encodes to no tokens".into());
    }
    // Stop at the end-of-text / end-of-turn tokens the vocabulary has.
    let stop: Vec<u32> = if ignore_eos {
        Vec::new()
    } else {
        ["<|endoftext|>", "<|im_end|>", "</s>", "<|eot_id|>"].iter().filter_map(|t| tok.token_to_id(t)).collect()
    };
    let mut session = edgec_runtime::lm::Session::new(&model)?;
    let mut generated: Vec<u32> = Vec::new();
    let mut shown = String::new();
    let mut out = std::io::stdout();
    let mut err: Option<String> = None;
    let stats = session
        .generate(&ids, max_tokens, &stop, sampling, &mut |t| {
            generated.push(t);
            match tok.decode(&generated, true) {
                // Print only whole characters: a token can end inside a UTF-8 sequence.
                Ok(s) if !s.ends_with('\u{fffd}') => {
                    if let Some(new) = s.strip_prefix(shown.as_str()) {
                        let _ = write!(out, "{new}");
                        let _ = out.flush();
                    }
                    shown = s;
                }
                Ok(_) => {}
                Err(e) => {
                    err = Some(e.to_string());
                    return false;
                }
            }
            true
        })
        .map_err(|e| e.to_string())?;
    if let Some(e) = err {
        return Err(format!("tokenizer: {e}"));
    }
    println!();
    let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    println!(
        "prompt: {} tokens in {:.2} s ({:.1} tok/s); generation: {} tokens in {:.2} s ({:.1} tok/s); {} thread(s)",
        stats.prompt_tokens,
        stats.prompt_secs,
        rate(stats.prompt_tokens, stats.prompt_secs),
        stats.generated,
        stats.generate_secs,
        rate(stats.generated, stats.generate_secs),
        model.threads()
    );
    Ok(())
}

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`edgec inspect M | head`) like other Unix tools, instead of
    // panicking in println!: Rust ignores SIGPIPE by default.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect { model, passes, after } => inspect(&model, passes, after),
        Command::Run { model, inputs, output_dir, threads, .. } if is_artifact(&model) => {
            run_artifact(&model, inputs, output_dir, threads)
        }
        Command::Run { model, inputs, output_dir, passes, .. } => run(&model, inputs, output_dir, passes),
        Command::Compile {
            model,
            target,
            cpu,
            features,
            max_seq,
            max_batch,
            bounds,
            passes,
            logits,
            output,
            emit,
            weights_file,
            prefix,
            symbols,
            listing,
            sparse,
            tokenizer,
            optimize,
            prune,
        } => parse_bounds(&bounds).and_then(|bounds| {
            let opts = edgec::codegen::Options {
                target,
                cpu,
                features,
                max_seq: Some(max_seq),
                max_batch: Some(max_batch),
                bounds,
                sparse,
                listing,
            };
            let last = logits == "last";
            compile(
                &model,
                opts,
                &passes,
                last,
                output,
                &emit,
                weights_file,
                &prefix,
                symbols,
                tokenizer,
                &optimize,
                &prune,
            )
        }),
        Command::Bench { model, inputs, runs, warmup, threads } => bench(&model, inputs, runs, warmup, threads),
        Command::Eval { model, text, ctx, max_windows, threads, reference } => {
            eval(&model, &text, ctx, max_windows, threads, reference.as_deref())
        }
        Command::Generate {
            model,
            prompt,
            chat,
            system,
            max_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            seed,
            threads,
            ignore_eos,
        } => {
            let sampling = edgec_runtime::lm::Sampling { temperature, top_k, top_p, repetition_penalty, seed };
            generate(&model, &prompt, chat, system.as_deref(), max_tokens, &sampling, threads, ignore_eos)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

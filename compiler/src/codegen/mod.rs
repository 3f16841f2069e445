//! Native code generation with Cranelift: plan memory, lower every node to kernels, compile each
//! node's kernels into one function (shared by the nodes alike but for their buffers), link the
//! functions behind an entry point, and package the result as a `.edgec` artifact
//! (docs/artifact-format.md) or an ELF object.

pub mod attention;
pub mod emit;
pub mod gather;
pub mod kv_cache;
pub mod layout;
pub mod link;
pub mod lower;
pub mod map;
pub mod math;
pub mod matmul;
pub mod object;
pub mod plan;
pub mod qmatmul;
pub mod reduce;
pub mod spmm;
pub mod target;
pub mod tiles;

use std::collections::HashMap;
use std::time::Instant;

use cranelift_codegen::entity::EntityRef;
use cranelift_codegen::ir::{types, AbiParam, ExternalName, Function, InstBuilder, Signature, UserFuncName};
use cranelift_codegen::{control::ControlPlane, Context, FinalizedRelocTarget};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use edgec_runtime::format::{self as fmt, CompileOptions, Meta, Symbol, TensorMeta};

use crate::error::{Error, Result};
use crate::ir::{DType, Dim, Graph, ValueRef};
use crate::passes::shape_infer;
use emit::{Kb, Loc};
use link::{CompiledFunc, FixTarget, Fixup};
use lower::{Kernel, LowerCx};
use map::{Expr, MapKernel, View};
pub use target::Target;

/// Default bound for symbolic dims when neither the model nor the user gives one.
pub const DEFAULT_MAX_SEQ: u64 = 2048;

#[derive(Clone, Debug, Default)]
pub struct Options {
    /// `host`, `x86_64`, `aarch64`, `riscv64` or a triple.
    pub target: String,
    pub cpu: Option<String>,
    pub features: Option<String>,
    /// Bound for every symbol except batch-like ones (default 2048).
    pub max_seq: Option<u64>,
    /// Bound for batch-like symbols (names containing "batch"; default 1).
    pub max_batch: Option<u64>,
    /// Explicit per-symbol bounds (`--bound NAME=N`), overriding the defaults.
    pub bounds: Vec<(String, u64)>,
    /// When pruned weights get the block-sparse matmul kernel.
    pub sparse: plan::SparseMode,
    /// Keep Cranelift's listing of every function's machine instructions (`Compiled::listing`).
    pub listing: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub nodes: usize,
    pub kernels: usize,
    pub functions: usize,
    pub code_bytes: usize,
    pub weight_bytes: usize,
    pub arena_bytes: u64,
    /// Arena bytes without lifetime-based sharing, for comparison.
    pub arena_unshared: u64,
    /// KV-cache tensors kept in the arena, and their bytes (included in `arena_bytes`).
    pub kv_slots: usize,
    pub kv_bytes: u64,
    /// Matmul weights stored block-sparse, their bytes, and the bytes they would take dense.
    pub sparse_weights: usize,
    pub sparse_bytes: u64,
    pub sparse_dense_bytes: u64,
    pub compile_ms: f64,
}

pub struct Compiled {
    pub target: Target,
    pub meta: Meta,
    pub code: Vec<u8>,
    pub weights: Vec<u8>,
    pub stats: Stats,
    /// Each function's (offset in CODE, size, name): the node it computes, for profilers.
    pub functions: Vec<(u64, u64, String)>,
    /// With `Options::listing`: each function's machine instructions as Cranelift prints them
    /// (after register allocation), under a `=== name` line.
    pub listing: Option<String>,
}

impl Compiled {
    /// The function table as text, one `offset size name` line per function (hex offsets and
    /// sizes, as in a perf map); see `EDGEC_PERF_MAP` in the runtime.
    pub fn symbol_map(&self) -> String {
        self.functions.iter().map(|(o, s, n)| format!("{o:x} {s:x} {n}\n")).collect()
    }
}

impl Compiled {
    pub fn artifact(&self) -> Result<Vec<u8>> {
        self.artifact_with_tokenizer(None)
    }

    /// The artifact with a TOKENIZER section (`tokenizer.json` bytes) for language models.
    pub fn artifact_with_tokenizer(&self, tokenizer: Option<&[u8]>) -> Result<Vec<u8>> {
        let triple = self.target.triple.to_string();
        fmt::ArtifactWriter::new(&triple, self.target.features, &self.meta, &self.code, &self.weights)
            .with_tokenizer(tokenizer)
            .to_bytes()
            .map_err(|e| Error::Invalid(format!("writing the artifact: {e}")))
    }
}

fn runtime_dim(d: &Dim) -> fmt::Dim {
    fmt::Dim(d.terms().map(|(c, syms)| fmt::Term(*c, syms.clone())).collect())
}

/// Default bound of a symbol: batch-like dims get `max_batch` (1 on a device), others `max_seq`.
fn default_bound(name: &str, max_seq: u64, max_batch: u64) -> u64 {
    if name.to_ascii_lowercase().contains("batch") {
        max_batch
    } else {
        max_seq
    }
}

pub fn compile(graph: &Graph, opts: &Options) -> Result<Compiled> {
    compile_with_progress(graph, opts, &mut |_, _| {})
}

/// `compile`, calling `progress(done, total)` as the node functions are compiled.
pub fn compile_with_progress(
    graph: &Graph,
    opts: &Options,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Compiled> {
    let t0 = Instant::now();
    let target = Target::parse(&opts.target, opts.cpu.as_deref(), opts.features.as_deref())?;
    let mut g = graph.clone();
    let inferred = shape_infer::infer(&mut g)?;

    // Symbols come from the input shapes, each dim a constant or a lone symbol.
    let mut symbols: Vec<String> = Vec::new();
    let mut inputs_meta = Vec::new();
    for &n in &g.inputs {
        let v = ValueRef { node: n, slot: 0 };
        let val = g.value(v);
        let shape = val.ty.shape.clone().ok_or_else(|| Error::Invalid(format!("input `{}` has no shape", val.name)))?;
        for d in &shape {
            if d.is_fixed() {
                continue;
            }
            let s = d.as_sym().ok_or_else(|| {
                Error::Invalid(format!("input `{}`: dim `{d}` must be a constant or a single symbol", val.name))
            })?;
            if !symbols.iter().any(|x| x == s) {
                symbols.push(s.to_string());
            }
        }
        inputs_meta.push(TensorMeta {
            name: val.name.clone(),
            dtype: val.ty.dtype,
            shape: shape.iter().map(runtime_dim).collect(),
        });
    }
    let max_seq = opts.max_seq.unwrap_or(DEFAULT_MAX_SEQ);
    for (name, _) in &opts.bounds {
        if !symbols.contains(name) {
            return Err(Error::Invalid(format!("--bound `{name}`: the model's inputs have no such symbol")));
        }
    }
    let bounds: HashMap<String, u64> = symbols
        .iter()
        .map(|s| {
            let b = opts
                .bounds
                .iter()
                .find(|(n, _)| n == s)
                .map(|b| b.1)
                .unwrap_or_else(|| default_bound(s, max_seq, opts.max_batch.unwrap_or(1)));
            (s.clone(), b)
        })
        .collect();
    for (s, &b) in &bounds {
        if b == 0 || b > i64::MAX as u64 {
            return Err(Error::Invalid(format!("bound of `{s}` must be in 1..2^63")));
        }
    }
    let plan =
        plan::plan(&g, &inferred, &|s| bounds.get(s).map_or(i64::MAX, |&b| b as i64), target.simd(), opts.sparse)?;
    // Every dim the code evaluates must use bound symbols only.
    for v in plan.locs.keys() {
        if let Some(shape) = &g.ty(*v).shape {
            for d in shape {
                if let Some(s) = d.symbols().find(|s| !bounds.contains_key(*s)) {
                    return Err(Error::Invalid(format!(
                        "value `{}` has dim `{d}` with symbol `{s}`, which no input shape binds (dynamic shapes from data are not compiled)",
                        g.value(*v).name
                    )));
                }
            }
        }
    }
    let outputs_meta = g
        .outputs
        .iter()
        .map(|o| {
            let ty = g.ty(o.value);
            TensorMeta {
                name: o.name.clone(),
                dtype: ty.dtype,
                shape: ty.shape.as_ref().expect("checked by the plan").iter().map(runtime_dim).collect(),
            }
        })
        .collect();

    // Kernels per node, then the copies into outputs that alias inputs, weights or other outputs.
    let mut groups: Vec<(String, Vec<Kernel>)> = Vec::new();
    let requires = std::cell::RefCell::new(Vec::new());
    for &n in &plan.order {
        let node = g.node(n);
        if matches!(node.op, crate::ir::Op::Input { .. } | crate::ir::Op::Const { .. }) {
            continue;
        }
        let kernels = if plan.known.contains(&n) {
            (0..node.outputs.len())
                .map(|s| ValueRef { node: n, slot: s })
                .filter(|v| plan.locs.contains_key(v))
                .map(|v| Kernel::Values {
                    loc: plan.locs[&v],
                    dtype: g.ty(v).dtype,
                    values: inferred.values[&v].clone(),
                })
                .collect()
        } else {
            let cx = LowerCx {
                g: &g,
                inferred: &inferred,
                locs: &plan.locs,
                scratch: plan.scratch.get(&n).copied(),
                packed: &plan.packed,
                sparse: &plan.sparse,
                requires: &requires,
                nbits: &plan.nbits,
                kv: &plan.kv,
            };
            let ks = lower::lower_node(&cx, n)?;
            // An alias of its input copies nothing (a Dropout mask would still need writing).
            if plan.aliases.contains(&n) {
                ks.into_iter().skip(1).collect()
            } else {
                ks
            }
        };
        if !kernels.is_empty() {
            groups.push((node.name.clone(), kernels));
        }
    }
    let mut copies = Vec::new();
    for &(i, v) in &plan.output_copies {
        let shape = g.ty(v).shape.clone().expect("checked");
        let dt = g.ty(v).dtype;
        copies.push(Kernel::Map(Box::new(MapKernel {
            dims: shape.clone(),
            out: View::dense(Loc::Output(i), dt, &shape),
            inputs: vec![View::dense(plan.locs[&v], dt, &shape)],
            expr: Expr::In(0),
        })));
    }
    if !copies.is_empty() {
        groups.push(("output copies".into(), copies));
    }

    // Compile. Nodes whose kernels are alike but for where their tensors live (the same layer of
    // each transformer block) share one function, called with a parameter block of base
    // addresses (`emit::parameterise`); so do their matmul and attention tasks. Function numbers:
    // one per distinct group, then one per distinct task, then the entry calling the groups in
    // order.
    let mut shared = Shared::default();
    let mut calls = Vec::with_capacity(groups.len());
    let mut kernels = 0;
    for (name, ks) in &groups {
        kernels += ks.len();
        let mut body = Body::Group(ks.clone());
        let params = emit::parameterise(body.locs_mut());
        calls.push((shared.add(name, body, 1), params));
    }
    let n_groups = shared.bodies.len();
    let mut funcs = Vec::with_capacity(n_groups + 1);
    let mut fctx = FunctionBuilderContext::new();
    let mut ctx = Context::new();
    let sig = kernel_signature(&target);
    let task_sig = task_signature(&target);
    let mut i = 0;
    while i < shared.bodies.len() {
        if i < n_groups {
            progress(i, n_groups);
        }
        let is_task = !matches!(shared.bodies[i].body, Body::Group(_));
        ctx.func = Function::with_name_signature(
            UserFuncName::user(0, i as u32),
            if is_task { task_sig.clone() } else { sig.clone() },
        );
        {
            let fb = FunctionBuilder::new(&mut ctx.func, &mut fctx);
            let mut kb = Kb::new(fb, &target, &symbols);
            // Moved out while emitting: a group's tasks are added to `shared` meanwhile.
            let body = std::mem::replace(&mut shared.bodies[i].body, Body::Group(Vec::new()));
            let (name, uses) = (shared.bodies[i].name.clone(), shared.bodies[i].uses);
            match &body {
                Body::Group(ks) => {
                    for k in ks {
                        // Matmuls and attention run as parallel tasks, shared like the groups.
                        let task = match k {
                            Kernel::MatMul(mm) => Some((Body::MatMul(mm.clone()), matmul::units_and_work(&mut kb, mm))),
                            Kernel::Attention(ak) => {
                                Some((Body::Attention(ak.clone()), attention::units_and_work(&mut kb, ak)))
                            }
                            _ => None,
                        };
                        let Some((mut task, (units, work))) = task else {
                            emit_kernel(&mut kb, k);
                            continue;
                        };
                        let params = emit::parameterise(task.locs_mut());
                        let index = shared.add(&format!("{name} (task)"), task, uses);
                        let block = kb.param_block(&params);
                        emit_parallel(&mut kb, block, units, work, index as u32, &task_sig);
                    }
                }
                Body::MatMul(mm) => {
                    let range = (kb.params[0], kb.params[1]);
                    matmul::emit_matmul(&mut kb, mm, Some(range));
                }
                Body::Attention(ak) => {
                    let range = (kb.params[0], kb.params[1]);
                    attention::emit_attention(&mut kb, ak, Some(range));
                }
            }
            shared.bodies[i].body = body;
            kb.finish();
        }
        funcs.push(compile_func(&mut ctx, &target, &shared.bodies[i].name, opts.listing)?);
        i += 1;
    }
    let entry_index = funcs.len();
    ctx.func = Function::with_name_signature(UserFuncName::user(0, entry_index as u32), sig.clone());
    {
        let fb = FunctionBuilder::new(&mut ctx.func, &mut fctx);
        let mut kb = Kb::new_entry(fb, &target, &symbols);
        let sigref = kb.fb.import_signature(sig.clone());
        for (index, params) in &calls {
            let f = import_user_function(&mut kb, *index as u32, sigref);
            let block = kb.param_block(params);
            kb.fb.ins().call(f, &[block]);
        }
        kb.finish();
    }
    funcs.push(compile_func(&mut ctx, &target, "entry", opts.listing)?);
    let mut names: Vec<String> = shared
        .bodies
        .iter()
        .map(|b| if b.uses > 1 { format!("{} (+{} alike)", b.name, b.uses - 1) } else { b.name.clone() })
        .collect();
    names.push("entry".into());
    let (code, offsets) = link::link(&funcs)?;
    let symbols_meta: Vec<Symbol> = symbols.iter().map(|s| Symbol { name: s.clone(), max: bounds[s] }).collect();
    let meta = Meta {
        model_name: if g.name.is_empty() { "model".into() } else { g.name.clone() },
        symbols: symbols_meta,
        inputs: inputs_meta,
        outputs: outputs_meta,
        arena_bytes: plan.arena_bytes,
        entry_offset: offsets[entry_index],
        compile_options: CompileOptions { target: target.triple.to_string(), features: target.feature_text(), max_seq },
        kv_cache: {
            let mut slots: Vec<fmt::KvCacheSlot> = plan
                .kv
                .values()
                .map(|s| fmt::KvCacheSlot { input: s.input, output: s.output, axis: s.axis, capacity: s.capacity })
                .collect();
            slots.sort_by_key(|s| s.output);
            slots
        },
        requires: {
            let mut r: Vec<fmt::Requirement> = requires
                .into_inner()
                .into_iter()
                .map(|(d, min, what)| fmt::Requirement { dim: runtime_dim(&d), min, what })
                .collect();
            // One per distinct condition.
            let mut seen = std::collections::HashSet::new();
            r.retain(|x| seen.insert((x.dim.to_string(), x.min)));
            r
        },
    };
    let stats = Stats {
        nodes: plan.order.len(),
        kernels,
        functions: funcs.len(),
        code_bytes: code.len(),
        weight_bytes: plan.weights.len(),
        arena_bytes: plan.arena_bytes,
        arena_unshared: plan.arena_unshared,
        kv_slots: plan.kv.len(),
        sparse_weights: plan.sparse.len(),
        sparse_bytes: plan.sparse.values().map(|s| s.bytes() as u64).sum(),
        sparse_dense_bytes: plan.sparse.values().map(|s| s.dense_bytes() as u64).sum(),
        kv_bytes: plan.kv.values().map(|s| s.bytes).sum(),
        compile_ms: t0.elapsed().as_secs_f64() * 1e3,
    };
    let listing = opts.listing.then(|| {
        funcs.iter().zip(&names).map(|(f, n)| format!("=== {n}\n{}", f.listing.as_deref().unwrap_or(""))).collect()
    });
    let functions = offsets
        .iter()
        .zip(&funcs)
        .zip(names)
        .map(|((&o, f), n)| (o, f.code.len() as u64, n.replace(['\n', ' '], "_")))
        .collect();
    Ok(Compiled { target, meta, code, weights: plan.weights, stats, functions, listing })
}

/// Graph inputs that only shape the computation (axes, slice bounds, Trilu's k, ...): compiled code
/// cannot take them at run time; freeze them with `Graph::freeze_input` first.
pub fn shape_parameter_inputs(g: &Graph) -> Vec<String> {
    g.inputs
        .iter()
        .filter(|&&n| {
            let users = g.users_of(ValueRef { node: n, slot: 0 });
            // Some use takes its *values* as a shape parameter (Shape/Size only read the shape).
            users.iter().any(|&(u, slot)| {
                let op = &g.node(u).op;
                !lower::reads_input(op, slot) && !matches!(op, crate::ir::Op::Shape { .. } | crate::ir::Op::Size)
            })
        })
        .map(|&n| g.node(n).outputs[0].name.clone())
        .collect()
}

fn kernel_signature(target: &Target) -> Signature {
    let mut sig = Signature::new(target.isa.default_call_conv());
    sig.params.push(AbiParam::new(types::I64));
    sig
}

/// Below this many multiply-adds a matmul runs on the calling thread (waking workers costs more).
const PARALLEL_MIN_WORK: i64 = 1 << 17;

/// `void task(const Params *block, int64_t begin, int64_t end)` (block: `emit`'s parameter block).
fn task_signature(target: &Target) -> Signature {
    let mut sig = Signature::new(target.isa.default_call_conv());
    sig.params.extend([AbiParam::new(types::I64), AbiParam::new(types::I64), AbiParam::new(types::I64)]);
    sig
}

/// What a generated function computes: a group of kernels (one node's, in the entry's order) or
/// a kernel split into `parallel_for` units (its task computes a range of units).
#[derive(Debug)]
enum Body {
    Group(Vec<Kernel>),
    MatMul(Box<matmul::MatMulKernel>),
    Attention(Box<attention::AttentionKernel>),
}

impl Body {
    /// Every buffer location the body reads or writes.
    fn locs_mut(&mut self) -> Vec<&mut Loc> {
        match self {
            Body::Group(ks) => ks.iter_mut().flat_map(|k| k.locs_mut()).collect(),
            Body::MatMul(mm) => mm.locs_mut(),
            Body::Attention(ak) => ak.locs_mut(),
        }
    }
}

struct SharedBody {
    /// The first node's name.
    name: String,
    body: Body,
    /// How many nodes call it.
    uses: usize,
}

/// The distinct function bodies, keyed by their text (parameterised kernels print alike exactly
/// when they compile alike).
#[derive(Default)]
struct Shared {
    bodies: Vec<SharedBody>,
    index: HashMap<String, usize>,
}

impl Shared {
    /// The function number of `body`, added under `name` unless an alike one exists; `uses`
    /// nodes call it.
    fn add(&mut self, name: &str, body: Body, uses: usize) -> usize {
        let key = format!("{body:?}");
        if let Some(&i) = self.index.get(&key) {
            self.bodies[i].uses += uses;
            return i;
        }
        self.bodies.push(SharedBody { name: name.to_string(), body, uses });
        self.index.insert(key, self.bodies.len() - 1);
        self.bodies.len() - 1
    }
}

/// A reference to generated function `index` from the function being built.
fn import_user_function(
    kb: &mut Kb,
    index: u32,
    sigref: cranelift_codegen::ir::SigRef,
) -> cranelift_codegen::ir::FuncRef {
    let name = kb.fb.func.declare_imported_user_function(cranelift_codegen::ir::UserExternalName::new(0, index));
    kb.fb.import_function(cranelift_codegen::ir::ExtFuncData {
        name: ExternalName::user(name),
        signature: sigref,
        colocated: true,
        patchable: false,
    })
}

/// Runs task function `index` over all its `units`: through the runtime's `parallel_for`
/// when there is one and the `work` (multiply-adds) is large enough, else directly.
fn emit_parallel(
    kb: &mut Kb,
    block: cranelift_codegen::ir::Value,
    units: cranelift_codegen::ir::Value,
    work: cranelift_codegen::ir::Value,
    index: u32,
    task_sig: &Signature,
) {
    use cranelift_codegen::ir::condcodes::IntCC;
    let (pf, pctx) = kb.parallel_for();
    let sigref = kb.fb.import_signature(task_sig.clone());
    let task = import_user_function(kb, index, sigref);
    let has_pool = kb.fb.ins().icmp_imm_u(IntCC::NotEqual, pf, 0);
    let big = kb.fb.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, work, PARALLEL_MIN_WORK);
    let par = kb.fb.ins().band(has_pool, big);
    let par_block = kb.fb.create_block();
    let serial_block = kb.fb.create_block();
    let done = kb.fb.create_block();
    kb.fb.ins().brif(par, par_block, &[], serial_block, &[]);
    kb.fb.switch_to_block(par_block);
    // void parallel_for(void *ctx, task, const void *params, int64_t n)
    let mut pf_sig = Signature::new(kb.target.isa.default_call_conv());
    pf_sig.params.extend([AbiParam::new(types::I64); 4]);
    let pf_ref = kb.fb.import_signature(pf_sig);
    let addr = kb.fb.ins().func_addr(types::I64, task);
    kb.fb.ins().call_indirect(pf_ref, pf, &[pctx, addr, block, units]);
    kb.fb.ins().jump(done, &[]);
    kb.fb.switch_to_block(serial_block);
    let zero = kb.iconst(0);
    kb.fb.ins().call(task, &[block, zero, units]);
    kb.fb.ins().jump(done, &[]);
    kb.fb.switch_to_block(done);
}

fn emit_kernel(kb: &mut Kb, k: &Kernel) {
    match k {
        Kernel::Map(m) => map::emit_map(kb, m),
        Kernel::Reduce(rows, kind) => reduce::emit_reduce(kb, rows, *kind),
        Kernel::Softmax(rows, log) => reduce::emit_softmax(kb, rows, *log),
        Kernel::LayerNorm { rows, eps, has_bias, stats } => reduce::emit_layer_norm(kb, rows, *eps, *has_bias, *stats),
        Kernel::ArgReduce { rows, max, last } => reduce::emit_arg_reduce(kb, rows, *max, *last),
        Kernel::CumSum { rows, exclusive, reverse } => reduce::emit_cumsum(kb, rows, *exclusive, *reverse),
        Kernel::MatMul(m) => matmul::emit_matmul(kb, m, None),
        Kernel::Attention(a) => attention::emit_attention(kb, a, None),
        Kernel::RmsNorm { rows, eps } => reduce::emit_rms_norm(kb, rows, *eps),
        Kernel::QuantizeRows { a, rows, scratch, pk } => qmatmul::emit_quantize_rows(kb, *a, rows, *scratch, pk),
        Kernel::Gather(gk) => gather::emit_gather(kb, gk),
        Kernel::IfBuffer(loc, k) => {
            let base = kb.base(*loc);
            let given = kb.fb.ins().icmp_imm_u(cranelift_codegen::ir::condcodes::IntCC::NotEqual, base, 0);
            kb.if_then(given, |kb| emit_kernel(kb, k));
        }
        Kernel::Values { loc, dtype, values } => {
            let base = kb.base(*loc);
            for (i, d) in values.iter().enumerate() {
                let v = kb.dim(d);
                let v = map::cast(kb, v, DType::I64, *dtype);
                map::store_elem(kb, *dtype, v, base, (i * dtype.size()) as i32);
            }
        }
    }
}

fn compile_func(ctx: &mut Context, target: &Target, name: &str, listing: bool) -> Result<CompiledFunc> {
    let callee_of: Vec<u32> = ctx.func.params.user_named_funcs().values().map(|n| n.index).collect();
    ctx.set_disasm(listing);
    let compiled = ctx
        .compile(&*target.isa, &mut ControlPlane::default())
        .map_err(|e| Error::Invalid(format!("code generation failed in `{name}`: {:?}", e.inner)))?;
    let mut fixups = Vec::new();
    for r in compiled.buffer.relocs() {
        let target = match &r.target {
            FinalizedRelocTarget::ExternalName(ExternalName::User(u)) => FixTarget::Func(callee_of[u.index()] as usize),
            FinalizedRelocTarget::Func(off) => FixTarget::Local(*off),
            other => {
                return Err(Error::Invalid(format!(
                    "internal: `{name}` needs external symbol {other:?}; generated code must be self-contained"
                )))
            }
        };
        fixups.push(Fixup { at: r.offset, kind: r.kind, target, addend: r.addend });
    }
    let f = CompiledFunc {
        code: compiled.code_buffer().to_vec(),
        fixups,
        alignment: compiled.buffer.alignment,
        listing: compiled.vcode.clone(),
    };
    ctx.clear();
    Ok(f)
}

/// Runs a loaded artifact with named IR tensors (any order), returning outputs in META order.
pub fn run_model(
    model: &edgec_runtime::Model,
    feeds: &[(String, crate::ir::Tensor)],
) -> Result<Vec<(String, crate::ir::Tensor)>> {
    let mut bufs = Vec::new();
    for m in model.inputs() {
        let (_, t) = feeds
            .iter()
            .find(|(n, _)| *n == m.name)
            .ok_or_else(|| Error::Invalid(format!("no value given for input `{}`", m.name)))?;
        let rt = edgec_runtime::Tensor::from_bytes(t.dtype(), t.shape.clone(), &t.to_le_bytes())
            .map_err(|e| Error::Invalid(format!("input `{}`: {e}", m.name)))?;
        bufs.push(rt);
    }
    let views: Vec<_> = bufs.iter().map(|t| t.view()).collect();
    let outs = model.run(&views).map_err(|e| Error::Invalid(e.to_string()))?;
    model
        .outputs()
        .iter()
        .zip(outs)
        .map(|(m, t)| {
            let it =
                crate::ir::Tensor::from_le_bytes(t.dtype(), t.shape().to_vec(), t.bytes()).map_err(Error::Invalid)?;
            Ok((m.name.clone(), it))
        })
        .collect()
}

//! edgec-runtime: the thin on-device loader and runner for `.edgec` artifacts.
//!
//! It depends on neither Cranelift nor the compiler, so a device needs only this crate and one
//! artifact file. The format is specified in `docs/artifact-format.md`.
//!
//! Every byte of an artifact is checked (checksums, bounds, schema) before anything is trusted,
//! which catches corruption and mismatched builds. It cannot make hostile machine code safe: an
//! artifact is a program, so load only artifacts you would run as one.

use std::collections::HashMap;
use std::ffi::c_void;
use std::fs::File;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use memmap2::Mmap;

pub mod artifact;
pub mod capi;
pub mod format;
pub mod host;
pub mod lm;
pub mod pool;
pub mod tensor;

pub use artifact::{Artifact, LoadError};
pub use format::{Arch, ArtifactWriter, DType, Dim, KvCacheSlot, Meta, SectionKind, TensorMeta, WriteError};
pub use tensor::{AlignedBuf, Element, Tensor, TensorError, TensorView};

/// The argument of the entry function, exactly as in the spec (every field 8 bytes).
#[repr(C)]
#[derive(Debug)]
pub struct EdgecCall {
    pub inputs: *const *const c_void,
    pub outputs: *const *mut c_void,
    pub weights: *const u8,
    pub arena: *mut u8,
    pub symbols: *const i64,
    /// Reserved for the runtime's thread pool; null runs serially.
    pub parallel_for: *mut c_void,
    pub parallel_ctx: *mut c_void,
}

type EntryFn = unsafe extern "C" fn(*const EdgecCall);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    #[error("expected {expected} inputs, got {got}")]
    InputCount { expected: usize, got: usize },
    #[error("input `{name}`: dtype {got}, expected {expected}")]
    Dtype { name: String, expected: DType, got: DType },
    #[error("input `{name}`: rank {got}, expected {expected}")]
    Rank { name: String, expected: usize, got: usize },
    #[error("input `{name}` axis {axis}: size {got}, expected {expected}")]
    Dim { name: String, axis: usize, expected: String, got: usize },
    #[error("input `{name}`: symbol `{symbol}` is {got} here but {bound} in input `{first}`")]
    SymbolConflict { name: String, symbol: String, got: usize, bound: usize, first: String },
    #[error("symbol `{symbol}` = {value} is outside 0..={max}")]
    SymbolRange { symbol: String, value: usize, max: u64 },
    #[error("input `{name}`: {got} data bytes, its shape needs {expected}")]
    DataLength { name: String, expected: String, got: usize },
    #[error("input `{name}`: data is not aligned to its {align}-byte elements")]
    Misaligned { name: String, align: usize },
    #[error("input `{name}`: bool byte {value} at index {index} is not 0 or 1")]
    Bool { name: String, index: usize, value: u8 },
    #[error("output `{name}`: shape: {reason}")]
    OutputShape { name: String, reason: String },
    #[error("expected {expected} output buffers, got {got}")]
    OutputCount { expected: usize, got: usize },
    #[error("output `{name}`: buffer is {got} bytes, needs {expected}")]
    OutputBuffer { name: String, expected: usize, got: usize },
    #[error("output `{name}`: buffer is not aligned to its {align}-byte elements")]
    OutputMisaligned { name: String, align: usize },
    #[error("{what} needs `{dim}` >= {min}, but it is {value} in this run")]
    Requirement { what: String, dim: String, value: u64, min: u64 },
    #[error("output `{name}`: {len} positions exceed the KV cache's capacity of {capacity} (compile with a larger --max-seq)")]
    KvCapacity { name: String, len: usize, capacity: u64 },
    #[error("input `{name}`: {reason}")]
    KvInput { name: String, reason: String },
    #[error(
        "the KV cache was overwritten by another run of this model since this session's last step; reset the session"
    )]
    KvCacheLost,
    #[error("this artifact keeps no KV cache in its arena")]
    NoKvCache,
    #[error(
        "logits for {positions} positions were asked for, but the artifact's `logits` output has {rows} row(s): \
         it computes only the last position, as an artifact compiled with `--logits last` (for generation) \
         does; per-position logits (perplexity, `edgec eval`) need an artifact compiled with `--logits all`"
    )]
    LogitsRows { positions: usize, rows: usize },
    #[error(transparent)]
    Tensor(#[from] TensorError),
}

/// A conversation's KV cache inside a model's arena (artifacts whose META lists `kv_cache`):
/// how many positions it holds. The arena holds one cache at a time; a run of another session,
/// or a plain `run`, overwrites it, which the next `run_cached` of this one reports.
#[derive(Debug)]
pub struct KvCache {
    len: usize,
    id: u64,
}

static NEXT_KV_ID: AtomicU64 = AtomicU64::new(1);

impl KvCache {
    /// Positions in the cache.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Forgets every position (the next step starts a new text).
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

/// The arena and which KV cache (by id; 0 = none) its cache regions hold.
#[derive(Debug)]
struct Arena {
    buf: AlignedBuf,
    kv_owner: u64,
}

/// A loaded, validated model ready to run. Runs may come from any thread; they take turns on the
/// one arena.
#[derive(Debug)]
pub struct Model {
    meta: Meta,
    triple: String,
    features: u64,
    /// The whole file, read-only; WEIGHTS is used in place.
    file: Mmap,
    weights: Range<usize>,
    /// Read+execute copy of CODE; `entry` points into it, so it lives as long as the model.
    _code: Mmap,
    entry: EntryFn,
    arena: Mutex<Arena>,
    /// Worker threads for the code's `parallel_for` calls (None: run serially).
    pool: Option<pool::Pool>,
    /// The TOKENIZER section's bytes in `file` (validated UTF-8), when present.
    tokenizer: Option<Range<usize>>,
}

impl Model {
    /// Maps and validates the artifact, checks this CPU can run it, then maps its code.
    ///
    /// The file must not be modified while the model is loaded (it is memory-mapped).
    pub fn load(path: impl AsRef<Path>) -> Result<Model, LoadError> {
        let path = path.as_ref();
        let io_err = |source| LoadError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io_err)?;
        // SAFETY: a read-only private map; the caller keeps the file unchanged while loaded.
        let map = unsafe { Mmap::map(&file) }.map_err(io_err)?;
        Model::from_map(map)
    }

    /// Loads an artifact held in memory (copied into a fresh page-aligned mapping first).
    pub fn from_bytes(bytes: &[u8]) -> Result<Model, LoadError> {
        let io_err = |source| LoadError::Io { path: "<memory>".into(), source };
        let mut m = memmap2::MmapMut::map_anon(bytes.len().max(1)).map_err(io_err)?;
        m[..bytes.len()].copy_from_slice(bytes);
        let map = m.make_read_only().map_err(io_err)?;
        Model::from_map(map)
    }

    fn from_map(map: Mmap) -> Result<Model, LoadError> {
        let art = Artifact::parse(&map[..])?;
        // Nothing is mapped executable until the CPU is known to fit.
        host::check_host(art.arch, art.features)?;
        let weights = art.section(SectionKind::Weights).map(|s| s.range()).unwrap_or_default();
        let tokenizer = art.section(SectionKind::Tokenizer).map(|s| s.range());
        if !(map.as_ptr() as usize + weights.start).is_multiple_of(tensor::BUFFER_ALIGN) {
            return Err(LoadError::WeightsAlignment);
        }
        let code = host::map_code(art.code)?;
        write_perf_map(code.as_ptr() as usize);
        let Artifact { meta, triple, features, .. } = art;
        // SAFETY: entry_offset < CODE length (validated); the artifact promises a C-ABI function
        // there, which is the trust the loader has to place in compiled code.
        let entry = unsafe { std::mem::transmute::<*const u8, EntryFn>(code.as_ptr().add(meta.entry_offset as usize)) };
        let arena = AlignedBuf::zeroed(meta.arena_bytes as usize).ok_or(LoadError::Arena(meta.arena_bytes))?;
        let threads = std::env::var("EDGEC_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or_else(default_threads);
        let pool = (threads > 1).then(|| pool::Pool::new(threads));
        Ok(Model {
            meta,
            triple,
            features,
            file: map,
            weights,
            _code: code,
            entry,
            arena: Mutex::new(Arena { buf: arena, kv_owner: 0 }),
            pool,
            tokenizer,
        })
    }

    /// Runs with `threads` threads in all (1 = serial). The default is the number of CPUs, or
    /// the `EDGEC_THREADS` environment variable.
    pub fn set_threads(&mut self, threads: usize) {
        if threads != self.threads() {
            self.pool = (threads > 1).then(|| pool::Pool::new(threads));
        }
    }

    pub fn threads(&self) -> usize {
        self.pool.as_ref().map_or(1, |p| p.threads())
    }

    /// The artifact's `tokenizer.json`, when it carries one.
    pub fn tokenizer_json(&self) -> Option<&str> {
        // Validated as UTF-8 by Artifact::parse.
        self.tokenizer.clone().and_then(|r| std::str::from_utf8(&self.file[r]).ok())
    }

    /// The artifact's tokenizer, ready to encode and decode.
    #[cfg(feature = "tokenizer")]
    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer, String> {
        let json = self.tokenizer_json().ok_or("the artifact has no tokenizer (compile with --tokenizer)")?;
        json.parse::<tokenizers::Tokenizer>().map_err(|e| format!("tokenizer: {e}"))
    }

    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    pub fn inputs(&self) -> &[TensorMeta] {
        &self.meta.inputs
    }

    pub fn outputs(&self) -> &[TensorMeta] {
        &self.meta.outputs
    }

    pub fn triple(&self) -> &str {
        &self.triple
    }

    pub fn features(&self) -> u64 {
        self.features
    }

    /// Runs the model; outputs come back in META order.
    pub fn run(&self, inputs: &[TensorView<'_>]) -> Result<Vec<Tensor>, RunError> {
        let (symbols, shapes) = self.prepare(inputs)?;
        let mut outputs = Vec::with_capacity(shapes.len());
        for (shape, m) in shapes.into_iter().zip(&self.meta.outputs) {
            outputs.push(Tensor::zeros(m.dtype, shape)?);
        }
        let ptrs = outputs.iter_mut().map(|t| t.bytes_mut().as_mut_ptr().cast()).collect();
        self.invoke(&input_ptrs(inputs), &symbols, ptrs, None)?;
        Ok(outputs)
    }

    /// Runs the model into caller buffers (each at least the output's size and aligned to its
    /// element size); returns the output shapes. Unlike `run`, the buffers are not zeroed first.
    pub fn run_into(&self, inputs: &[TensorView<'_>], outputs: &mut [&mut [u8]]) -> Result<Vec<Vec<usize>>, RunError> {
        let (symbols, shapes) = self.prepare(inputs)?;
        if outputs.len() != shapes.len() {
            return Err(RunError::OutputCount { expected: shapes.len(), got: outputs.len() });
        }
        for ((buf, shape), m) in outputs.iter().zip(&shapes).zip(&self.meta.outputs) {
            let needed = tensor::byte_len(m.dtype, shape).unwrap_or(usize::MAX);
            if buf.len() < needed {
                return Err(RunError::OutputBuffer { name: m.name.clone(), expected: needed, got: buf.len() });
            }
            if needed > 0 && !(buf.as_ptr() as usize).is_multiple_of(m.dtype.size()) {
                return Err(RunError::OutputMisaligned { name: m.name.clone(), align: m.dtype.size() });
            }
        }
        let ptrs = outputs.iter_mut().map(|b| b.as_mut_ptr().cast()).collect();
        self.invoke(&input_ptrs(inputs), &symbols, ptrs, None)?;
        Ok(shapes)
    }

    /// A new, empty KV cache for `run_cached`, when the artifact keeps its cache in the arena.
    pub fn kv_cache(&self) -> Option<KvCache> {
        (!self.meta.kv_cache.is_empty()).then(|| KvCache { len: 0, id: NEXT_KV_ID.fetch_add(1, Ordering::Relaxed) })
    }

    /// Runs one step with the KV cache in the arena: `inputs` in META order with `None` exactly
    /// at the cache inputs (`Meta::kv_cache`), whose past length is `cache.len()`. The step's
    /// positions are appended to the cache; outputs come back in META order, `None` at the cache
    /// outputs (they stay in the arena).
    pub fn run_cached(
        &self,
        inputs: &[Option<TensorView<'_>>],
        cache: &mut KvCache,
    ) -> Result<Vec<Option<Tensor>>, RunError> {
        let meta = &self.meta;
        if meta.kv_cache.is_empty() {
            return Err(RunError::NoKvCache);
        }
        if inputs.len() != meta.inputs.len() {
            return Err(RunError::InputCount { expected: meta.inputs.len(), got: inputs.len() });
        }
        let slot_of_input = |i: usize| meta.kv_cache.iter().find(|s| s.input == i);
        // Symbols the given inputs bind, for the shapes of the cache inputs.
        let mut known: HashMap<&str, usize> = HashMap::new();
        for (i, (t, m)) in inputs.iter().zip(&meta.inputs).enumerate() {
            let kv_err = |reason: &str| RunError::KvInput { name: m.name.clone(), reason: reason.into() };
            match (t, slot_of_input(i)) {
                (Some(_), Some(_)) => return Err(kv_err("is the KV cache kept in the arena: pass None")),
                (None, None) => return Err(kv_err("missing")),
                (Some(t), None) => {
                    check_input(t, m)?;
                    for (dim, &got) in m.shape.iter().zip(t.shape) {
                        if let Some(s) = dim.as_symbol() {
                            known.entry(s).or_insert(got);
                        }
                    }
                }
                (None, Some(_)) => {}
            }
        }
        let mut shapes: Vec<Vec<usize>> = Vec::with_capacity(inputs.len());
        for (i, (t, m)) in inputs.iter().zip(&meta.inputs).enumerate() {
            let shape = match (t, slot_of_input(i)) {
                (Some(t), _) => t.shape.to_vec(),
                (None, Some(slot)) => {
                    let mut shape = Vec::with_capacity(m.shape.len());
                    for (axis, dim) in m.shape.iter().enumerate() {
                        let v = match (dim.as_constant(), dim.as_symbol()) {
                            _ if axis == slot.axis => Some(cache.len),
                            (Some(c), _) => usize::try_from(c).ok(),
                            (None, Some(s)) => known.get(s).copied(),
                            (None, None) => None,
                        };
                        shape.push(v.ok_or_else(|| RunError::KvInput {
                            name: m.name.clone(),
                            reason: format!("no other input gives axis {axis} (`{dim}`)"),
                        })?);
                    }
                    shape
                }
                (None, None) => unreachable!("checked above"),
            };
            shapes.push(shape);
        }
        let (symbols, out_shapes) = self.bind(&shapes)?;
        let present = |o: usize| meta.kv_cache.iter().any(|s| s.output == o);
        let mut outputs: Vec<Option<Tensor>> = Vec::with_capacity(out_shapes.len());
        for (o, (shape, m)) in out_shapes.iter().zip(&meta.outputs).enumerate() {
            outputs.push(if present(o) { None } else { Some(Tensor::zeros(m.dtype, shape.clone())?) });
        }
        let ptrs = outputs
            .iter_mut()
            .map(|t| t.as_mut().map_or(std::ptr::null_mut(), |t| t.bytes_mut().as_mut_ptr().cast()))
            .collect();
        let in_ptrs: Vec<*const c_void> =
            inputs.iter().map(|t| t.as_ref().map_or(std::ptr::null(), |t| t.data.as_ptr().cast())).collect();
        let slot = &meta.kv_cache[0];
        let new_len = out_shapes[slot.output][slot.axis];
        self.invoke(&in_ptrs, &symbols, ptrs, Some(cache))?;
        cache.len = new_len;
        Ok(outputs)
    }

    /// Validates the inputs, binds the symbols and evaluates the output shapes.
    fn prepare(&self, inputs: &[TensorView<'_>]) -> Result<(Vec<i64>, Vec<Vec<usize>>), RunError> {
        let meta = &self.meta;
        if inputs.len() != meta.inputs.len() {
            return Err(RunError::InputCount { expected: meta.inputs.len(), got: inputs.len() });
        }
        for (t, m) in inputs.iter().zip(&meta.inputs) {
            check_input(t, m)?;
        }
        let shapes: Vec<Vec<usize>> = inputs.iter().map(|t| t.shape.to_vec()).collect();
        self.bind(&shapes)
    }

    /// Binds the symbols from the input shapes (checking fixed dims and bounds) and evaluates the
    /// output shapes; KV-cache outputs must fit their capacity.
    fn bind(&self, shapes: &[Vec<usize>]) -> Result<(Vec<i64>, Vec<Vec<usize>>), RunError> {
        let meta = &self.meta;
        // Per symbol: its value and the input that bound it.
        let mut bound: Vec<Option<(usize, usize)>> = vec![None; meta.symbols.len()];
        for (i, (shape, m)) in shapes.iter().zip(&meta.inputs).enumerate() {
            for (axis, (&got, dim)) in shape.iter().zip(&m.shape).enumerate() {
                if let Some(s) = dim.as_symbol().and_then(|n| meta.symbol_index(n)) {
                    match bound[s] {
                        None => bound[s] = Some((got, i)),
                        Some((v, first)) if v != got => {
                            let (symbol, first) = (meta.symbols[s].name.clone(), meta.inputs[first].name.clone());
                            return Err(RunError::SymbolConflict {
                                name: m.name.clone(),
                                symbol,
                                got,
                                bound: v,
                                first,
                            });
                        }
                        Some(_) => {}
                    }
                } else if dim.as_constant().and_then(|c| usize::try_from(c).ok()) != Some(got) {
                    return Err(RunError::Dim { name: m.name.clone(), axis, expected: dim.to_string(), got });
                }
            }
        }
        let mut values = Vec::with_capacity(bound.len());
        for (s, b) in meta.symbols.iter().zip(&bound) {
            // Every symbol is some input's dimension (validated at load), so it is bound.
            let value = b.map_or(0, |(v, _)| v);
            match i64::try_from(value) {
                // 0 is allowed: an empty KV cache (the first step of a decoder with past) has it.
                Ok(v) if v as u64 <= s.max => values.push(v),
                _ => return Err(RunError::SymbolRange { symbol: s.name.clone(), value, max: s.max }),
            }
        }
        let env: HashMap<&str, i64> =
            meta.symbols.iter().map(|s| s.name.as_str()).zip(values.iter().copied()).collect();
        for r in &meta.requires {
            let value = r.dim.eval(&env).unwrap_or(0);
            if value < r.min {
                return Err(RunError::Requirement { what: r.what.clone(), dim: r.dim.to_string(), value, min: r.min });
            }
        }
        let mut out_shapes = Vec::with_capacity(meta.outputs.len());
        for m in &meta.outputs {
            let shape_err = |reason: String| RunError::OutputShape { name: m.name.clone(), reason };
            let mut shape = Vec::with_capacity(m.shape.len());
            for (axis, dim) in m.shape.iter().enumerate() {
                let v = dim.eval(&env).map_err(|e| shape_err(format!("axis {axis} `{dim}`: {e}")))?;
                shape.push(usize::try_from(v).map_err(|_| shape_err(format!("axis {axis} = {v} is too large")))?);
            }
            if tensor::byte_len(m.dtype, &shape).is_none() {
                return Err(shape_err(format!("{shape:?} has more bytes than memory can address")));
            }
            out_shapes.push(shape);
        }
        for slot in &meta.kv_cache {
            let len = out_shapes[slot.output][slot.axis];
            if len as u64 > slot.capacity {
                let name = meta.outputs[slot.output].name.clone();
                return Err(RunError::KvCapacity { name, len, capacity: slot.capacity });
            }
        }
        Ok((values, out_shapes))
    }

    /// Calls the entry function; the inputs, symbols and outputs have been validated. With a
    /// cache, the arena must still hold it (or it must be empty); without one, the run overwrites
    /// whatever cache the arena held.
    fn invoke(
        &self,
        inputs: &[*const c_void],
        symbols: &[i64],
        outputs: Vec<*mut c_void>,
        cache: Option<&KvCache>,
    ) -> Result<(), RunError> {
        let mut arena = self.arena.lock().unwrap_or_else(PoisonError::into_inner);
        match cache {
            Some(c) if c.len > 0 && arena.kv_owner != c.id => return Err(RunError::KvCacheLost),
            Some(c) => arena.kv_owner = c.id,
            None => arena.kv_owner = 0,
        }
        let call = EdgecCall {
            inputs: inputs.as_ptr(),
            outputs: outputs.as_ptr(),
            weights: self.file[self.weights.clone()].as_ptr(),
            arena: arena.buf.as_mut_ptr(),
            symbols: symbols.as_ptr(),
            parallel_for: match &self.pool {
                Some(_) => pool::parallel_for as *mut c_void,
                None => std::ptr::null_mut(),
            },
            parallel_ctx: match &self.pool {
                Some(p) => p as *const pool::Pool as *mut c_void,
                None => std::ptr::null_mut(),
            },
        };
        // SAFETY: every pointer is valid and sized as META says for this run (null only where the
        // code keeps the KV cache in the arena, which it checks); the arena is ours alone while the
        // lock is held. The code itself is trusted (see the crate docs).
        unsafe { (self.entry)(&call) };
        Ok(())
    }
}

fn input_ptrs(inputs: &[TensorView<'_>]) -> Vec<*const c_void> {
    inputs.iter().map(|t| t.data.as_ptr().cast()).collect()
}

/// With `EDGEC_PERF_MAP=FILE` (the `offset size name` table `edgec compile --symbols` writes),
/// appends the loaded code's functions to `/tmp/perf-PID.map` so `perf report` names them.
/// A profiling aid only: failures are ignored.
fn write_perf_map(base: usize) {
    use std::io::Write;
    let Some(table) = std::env::var_os("EDGEC_PERF_MAP").and_then(|p| std::fs::read_to_string(p).ok()) else {
        return;
    };
    let path = format!("/tmp/perf-{}.map", std::process::id());
    let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) else { return };
    for line in table.lines() {
        let mut it = line.splitn(3, ' ');
        if let (Some(o), Some(s), Some(n)) = (it.next(), it.next(), it.next()) {
            if let (Ok(o), Ok(s)) = (usize::from_str_radix(o, 16), usize::from_str_radix(s, 16)) {
                let _ = writeln!(f, "{:x} {s:x} {n}", base + o);
            }
        }
    }
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Dtype, rank, byte length, alignment and bool values of one input (dims are checked by the caller).
fn check_input(t: &TensorView<'_>, m: &TensorMeta) -> Result<(), RunError> {
    let name = || m.name.clone();
    if t.dtype != m.dtype {
        return Err(RunError::Dtype { name: name(), expected: m.dtype, got: t.dtype });
    }
    if t.shape.len() != m.shape.len() {
        return Err(RunError::Rank { name: name(), expected: m.shape.len(), got: t.shape.len() });
    }
    let expected = tensor::byte_len(t.dtype, t.shape);
    if expected != Some(t.data.len()) {
        let expected = expected.map_or_else(|| "more than memory can address".into(), |n| n.to_string());
        return Err(RunError::DataLength { name: name(), expected, got: t.data.len() });
    }
    if !t.data.is_empty() && !(t.data.as_ptr() as usize).is_multiple_of(t.dtype.size()) {
        return Err(RunError::Misaligned { name: name(), align: t.dtype.size() });
    }
    if t.dtype == DType::Bool {
        if let Some(index) = t.data.iter().position(|&b| b > 1) {
            return Err(RunError::Bool { name: name(), index, value: t.data[index] });
        }
    }
    Ok(())
}

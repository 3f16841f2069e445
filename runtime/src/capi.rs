//! The C API (`runtime/include/edgec.h`). Every function catches panics, so none unwinds into C.

use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use crate::format::DType;
use crate::{KvCache, Model, TensorView};

/// Largest rank an `EdgecTensor` can describe.
pub const EDGEC_MAX_RANK: usize = 8;

/// A dense row-major tensor. Inputs: all fields are read. Outputs: the caller sets `data` and
/// `byte_len` (the buffer's capacity); the runtime fills `dtype`, `rank` and `shape`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EdgecTensor {
    pub dtype: i32,
    pub rank: u32,
    pub shape: [i64; EDGEC_MAX_RANK],
    pub data: *mut u8,
    pub byte_len: usize,
}

/// The opaque model handle: the model plus its names as C strings.
pub struct EdgecModel {
    model: Model,
    input_names: Vec<CString>,
    output_names: Vec<CString>,
}

/// Copies `msg` into `buf` (cut at a character boundary, always NUL-terminated).
unsafe fn write_err(buf: *mut c_char, len: usize, msg: &str) {
    if buf.is_null() || len == 0 {
        return;
    }
    let mut n = msg.len().min(len - 1);
    while !msg.is_char_boundary(n) {
        n -= 1;
    }
    std::ptr::copy_nonoverlapping(msg.as_ptr(), buf.cast::<u8>(), n);
    *buf.add(n) = 0;
}

/// Runs `f`, turning an error or a panic into a message in `err_buf`.
unsafe fn guard<T>(err_buf: *mut c_char, err_len: usize, f: impl FnOnce() -> Result<T, String>) -> Option<T> {
    let result =
        catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| Err("internal error: the runtime panicked".into()));
    match result {
        Ok(v) => {
            write_err(err_buf, err_len, "");
            Some(v)
        }
        Err(msg) => {
            write_err(err_buf, err_len, &msg);
            None
        }
    }
}

#[cfg(unix)]
fn path_from(c: &CStr) -> Result<PathBuf, String> {
    use std::os::unix::ffi::OsStrExt;
    Ok(PathBuf::from(std::ffi::OsStr::from_bytes(c.to_bytes())))
}

#[cfg(not(unix))]
fn path_from(c: &CStr) -> Result<PathBuf, String> {
    c.to_str().map(PathBuf::from).map_err(|_| "path is not UTF-8".to_string())
}

fn c_names(tensors: &[crate::TensorMeta]) -> Result<Vec<CString>, String> {
    tensors.iter().map(|t| CString::new(t.name.as_str()).map_err(|e| e.to_string())).collect()
}

/// Loads a model; returns NULL and a message in `err_buf` on failure.
///
/// # Safety
/// `path` is a NUL-terminated string; `err_buf` is NULL or writable for `err_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn edgec_model_load(
    path: *const c_char,
    err_buf: *mut c_char,
    err_len: usize,
) -> *mut EdgecModel {
    let loaded = guard(err_buf, err_len, || {
        if path.is_null() {
            return Err("path is NULL".into());
        }
        let model = Model::load(path_from(CStr::from_ptr(path))?).map_err(|e| e.to_string())?;
        let (input_names, output_names) = (c_names(model.inputs())?, c_names(model.outputs())?);
        Ok(Box::new(EdgecModel { model, input_names, output_names }))
    });
    loaded.map_or(std::ptr::null_mut(), Box::into_raw)
}

/// Frees a model from `edgec_model_load`; NULL is ignored.
///
/// # Safety
/// `model` is NULL or a pointer from `edgec_model_load` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn edgec_model_free(model: *mut EdgecModel) {
    if !model.is_null() {
        // Dropping only unmaps and frees; a panic here would be a bug, but must not reach C.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(Box::from_raw(model))));
    }
}

/// Sets the number of threads a model's runs use. Returns 0, or -1 for NULL or 0 threads.
///
/// # Safety
/// `model` is NULL or a live pointer from `edgec_model_load`, not used by another thread meanwhile.
#[no_mangle]
pub unsafe extern "C" fn edgec_model_set_threads(model: *mut EdgecModel, threads: usize) -> i32 {
    if model.is_null() || threads == 0 {
        return -1;
    }
    let m = &mut *model;
    match catch_unwind(AssertUnwindSafe(|| m.model.set_threads(threads))) {
        Ok(()) => 0,
        Err(_) => -1,
    }
}

/// `(start, end)` addresses of a buffer, for the overlap check.
fn span(t: &EdgecTensor) -> (usize, usize) {
    (t.data as usize, (t.data as usize).saturating_add(t.byte_len))
}

unsafe fn descriptors<'a>(ptr: *const EdgecTensor, n: usize, what: &str) -> Result<&'a [EdgecTensor], String> {
    match (ptr.is_null(), n) {
        (_, 0) => Ok(&[]),
        (true, _) => Err(format!("{what} is NULL")),
        (false, _) => Ok(std::slice::from_raw_parts(ptr, n)),
    }
}

/// Runs the model. Output buffers must not overlap each other or any input. Returns 0 on
/// success, -1 with a message in `err_buf` on failure.
///
/// # Safety
/// `model` comes from `edgec_model_load`; `inputs`/`outputs` point to `n_inputs`/`n_outputs`
/// descriptors whose `data` is readable (inputs) or writable (outputs) for `byte_len` bytes;
/// `err_buf` is NULL or writable for `err_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn edgec_model_run(
    model: *const EdgecModel,
    inputs: *const EdgecTensor,
    n_inputs: usize,
    outputs: *mut EdgecTensor,
    n_outputs: usize,
    err_buf: *mut c_char,
    err_len: usize,
) -> c_int {
    let ran = guard(err_buf, err_len, || {
        let m = &model.as_ref().ok_or("model is NULL")?.model;
        let in_desc = descriptors(inputs, n_inputs, "inputs")?;
        // A copy, so no shared reference aliases the descriptors written back below.
        let out_desc = descriptors(outputs, n_outputs, "outputs")?.to_vec();
        let shapes = input_shapes(in_desc)?;
        check_output_ranks(m)?;
        refuse_overlaps(in_desc, &out_desc)?;
        let mut views = Vec::with_capacity(in_desc.len());
        for (i, (d, shape)) in in_desc.iter().zip(&shapes).enumerate() {
            views.push(input_view(i, d, shape)?.ok_or(format!("input {i}: data is NULL"))?);
        }
        let mut bufs = Vec::with_capacity(out_desc.len());
        for (i, d) in out_desc.iter().enumerate() {
            bufs.push(match (d.data.is_null(), d.byte_len) {
                (_, 0) => &mut [][..],
                (true, _) => return Err(format!("output {i}: data is NULL")),
                (false, n) => std::slice::from_raw_parts_mut(d.data, n),
            });
        }
        let out_shapes = m.run_into(&views, &mut bufs).map_err(|e| e.to_string())?;
        for (j, shape) in out_shapes.iter().enumerate() {
            describe_output(m, &mut *outputs.add(j), j, shape);
        }
        Ok(())
    });
    if ran.is_some() {
        0
    } else {
        -1
    }
}

/// The shapes of the input descriptors (rank and sign checked).
fn input_shapes(in_desc: &[EdgecTensor]) -> Result<Vec<Vec<usize>>, String> {
    let mut shapes = Vec::with_capacity(in_desc.len());
    for (i, d) in in_desc.iter().enumerate() {
        let rank = d.rank as usize;
        if rank > EDGEC_MAX_RANK {
            return Err(format!("input {i}: rank {rank} is above {EDGEC_MAX_RANK}"));
        }
        let shape = d.shape[..rank].iter().map(|&v| usize::try_from(v)).collect::<Result<Vec<_>, _>>();
        shapes.push(shape.map_err(|_| format!("input {i}: negative dimension"))?);
    }
    Ok(shapes)
}

fn check_output_ranks(m: &Model) -> Result<(), String> {
    for (i, t) in m.outputs().iter().enumerate() {
        if t.shape.len() > EDGEC_MAX_RANK {
            return Err(format!("output {i}: rank {} is above {EDGEC_MAX_RANK}", t.shape.len()));
        }
    }
    Ok(())
}

/// Rust slices may not alias a mutable one: refuse overlapping output buffers.
fn refuse_overlaps(in_desc: &[EdgecTensor], out_desc: &[EdgecTensor]) -> Result<(), String> {
    for (i, o) in out_desc.iter().enumerate() {
        let (a, b) = span(o);
        let others = in_desc.iter().chain(out_desc.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, d)| d));
        if a < b && others.map(span).any(|(c, d)| c < d && a < d && c < b) {
            return Err(format!("output {i}: buffer overlaps another input or output"));
        }
    }
    Ok(())
}

/// Input `i` as a view; `None` when its data is NULL with a nonzero length.
unsafe fn input_view<'a>(i: usize, d: &EdgecTensor, shape: &'a [usize]) -> Result<Option<TensorView<'a>>, String> {
    let dtype = DType::from_code(d.dtype).ok_or(format!("input {i}: unknown dtype code {}", d.dtype))?;
    let data: &[u8] = match (d.data.is_null(), d.byte_len) {
        (_, 0) => &[],
        (true, _) => return Ok(None),
        (false, n) => std::slice::from_raw_parts(d.data, n),
    };
    Ok(Some(TensorView { dtype, shape, data }))
}

/// Fills output descriptor `j`'s dtype, rank and shape.
fn describe_output(m: &Model, d: &mut EdgecTensor, j: usize, shape: &[usize]) {
    d.dtype = m.outputs()[j].dtype.code();
    d.rank = shape.len() as u32;
    d.shape = [0; EDGEC_MAX_RANK];
    for (dst, &v) in d.shape.iter_mut().zip(shape) {
        *dst = v as i64;
    }
}

/// A KV cache kept in a model's arena (`edgec_model_run_cached`).
pub struct EdgecKvCache {
    cache: KvCache,
}

/// A new, empty KV cache for `model`; NULL with a message in `err_buf` when the model keeps none
/// (it was not compiled from a decoder with past inputs, or `model` is NULL).
///
/// # Safety
/// `model` is NULL or from `edgec_model_load`; `err_buf` is NULL or writable for `err_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn edgec_kv_cache_new(
    model: *const EdgecModel,
    err_buf: *mut c_char,
    err_len: usize,
) -> *mut EdgecKvCache {
    let made = guard(err_buf, err_len, || {
        let m = &model.as_ref().ok_or("model is NULL")?.model;
        let cache = m.kv_cache().ok_or("the model keeps no KV cache in its arena")?;
        Ok(Box::new(EdgecKvCache { cache }))
    });
    made.map_or(std::ptr::null_mut(), Box::into_raw)
}

/// Positions held by the cache (0 for NULL).
///
/// # Safety
/// `cache` is NULL or from `edgec_kv_cache_new`, not freed.
#[no_mangle]
pub unsafe extern "C" fn edgec_kv_cache_len(cache: *const EdgecKvCache) -> usize {
    cache.as_ref().map_or(0, |c| c.cache.len())
}

/// Frees a cache from `edgec_kv_cache_new`; NULL is ignored.
///
/// # Safety
/// `cache` is NULL or from `edgec_kv_cache_new`, not yet freed.
#[no_mangle]
pub unsafe extern "C" fn edgec_kv_cache_free(cache: *mut EdgecKvCache) {
    if !cache.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(Box::from_raw(cache))));
    }
}

/// One decoding step with the KV cache in the arena (`Model::run_cached`): every input in order,
/// the cache inputs (past keys/values) with `data` NULL; the step's positions are appended to
/// `cache`. Outputs: every output in order; the cache outputs (present keys/values) stay in the
/// arena: their descriptors are not read or written (`data` may be NULL; `edgec_kv_cache_len`
/// tells the cache's length); the others are copied into their buffers and described. Buffers are
/// checked after the step (the output shapes depend on it): a short one fails the call, but the
/// step's positions are in the cache, as the message says. Returns 0, or -1 with a message in `err_buf`.
///
/// # Safety
/// As `edgec_model_run`, and `cache` is from `edgec_kv_cache_new` for this model, not used by
/// another thread meanwhile.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn edgec_model_run_cached(
    model: *const EdgecModel,
    cache: *mut EdgecKvCache,
    inputs: *const EdgecTensor,
    n_inputs: usize,
    outputs: *mut EdgecTensor,
    n_outputs: usize,
    err_buf: *mut c_char,
    err_len: usize,
) -> c_int {
    let ran = guard(err_buf, err_len, || {
        let m = &model.as_ref().ok_or("model is NULL")?.model;
        let cache = &mut cache.as_mut().ok_or("cache is NULL")?.cache;
        let in_desc = descriptors(inputs, n_inputs, "inputs")?;
        let out_desc = descriptors(outputs, n_outputs, "outputs")?.to_vec();
        if out_desc.len() != m.outputs().len() {
            return Err(format!("{} outputs given, the model has {}", out_desc.len(), m.outputs().len()));
        }
        let shapes = input_shapes(in_desc)?;
        check_output_ranks(m)?;
        let mut views = Vec::with_capacity(in_desc.len());
        for (i, (d, shape)) in in_desc.iter().zip(&shapes).enumerate() {
            let at_cache = m.meta().kv_cache.iter().any(|s| s.input == i);
            views.push(if at_cache && d.data.is_null() { None } else { input_view(i, d, shape)? });
        }
        let got = m.run_cached(&views, cache).map_err(|e| e.to_string())?;
        for (j, (t, d)) in got.iter().zip(&out_desc).enumerate() {
            let Some(t) = t else { continue };
            let bytes = t.bytes();
            if bytes.len() > d.byte_len || (d.data.is_null() && !bytes.is_empty()) {
                return Err(format!(
                    "output {j}: needs {} bytes, the buffer has {} (the step was taken: the cache holds {} positions)",
                    bytes.len(),
                    if d.data.is_null() { 0 } else { d.byte_len },
                    cache.len()
                ));
            }
        }
        for (j, t) in got.iter().enumerate() {
            // Cache outputs (None) stay in the arena: their descriptors are left as they are.
            if let Some(t) = t {
                let d = &mut *outputs.add(j);
                if !t.bytes().is_empty() {
                    std::ptr::copy_nonoverlapping(t.bytes().as_ptr(), d.data, t.bytes().len());
                }
                describe_output(m, d, j, t.shape());
            }
        }
        Ok(())
    });
    if ran.is_some() {
        0
    } else {
        -1
    }
}

unsafe fn with_model<T>(model: *const EdgecModel, default: T, f: impl FnOnce(&EdgecModel) -> Option<T>) -> T {
    match model.as_ref() {
        Some(m) => catch_unwind(AssertUnwindSafe(|| f(m))).ok().flatten().unwrap_or(default),
        None => default,
    }
}

/// # Safety
/// `model` is NULL or from `edgec_model_load`.
#[no_mangle]
pub unsafe extern "C" fn edgec_model_input_count(model: *const EdgecModel) -> usize {
    with_model(model, 0, |m| Some(m.input_names.len()))
}

/// # Safety
/// `model` is NULL or from `edgec_model_load`.
#[no_mangle]
pub unsafe extern "C" fn edgec_model_output_count(model: *const EdgecModel) -> usize {
    with_model(model, 0, |m| Some(m.output_names.len()))
}

/// The input's name, owned by the model; NULL if `index` is out of range.
///
/// # Safety
/// `model` is NULL or from `edgec_model_load`.
#[no_mangle]
pub unsafe extern "C" fn edgec_model_input_name(model: *const EdgecModel, index: usize) -> *const c_char {
    with_model(model, std::ptr::null(), |m| m.input_names.get(index).map(|s| s.as_ptr()))
}

/// # Safety
/// `model` is NULL or from `edgec_model_load`.
#[no_mangle]
pub unsafe extern "C" fn edgec_model_output_name(model: *const EdgecModel, index: usize) -> *const c_char {
    with_model(model, std::ptr::null(), |m| m.output_names.get(index).map(|s| s.as_ptr()))
}

/// The input's `EDGEC_DTYPE_*`; -1 if `index` is out of range.
///
/// # Safety
/// `model` is NULL or from `edgec_model_load`.
#[no_mangle]
pub unsafe extern "C" fn edgec_model_input_dtype(model: *const EdgecModel, index: usize) -> i32 {
    with_model(model, -1, |m| m.model.inputs().get(index).map(|t| t.dtype.code()))
}

/// # Safety
/// `model` is NULL or from `edgec_model_load`.
#[no_mangle]
pub unsafe extern "C" fn edgec_model_output_dtype(model: *const EdgecModel, index: usize) -> i32 {
    with_model(model, -1, |m| m.model.outputs().get(index).map(|t| t.dtype.code()))
}

/// The input's rank; -1 if `index` is out of range.
///
/// # Safety
/// `model` is NULL or from `edgec_model_load`.
#[no_mangle]
pub unsafe extern "C" fn edgec_model_input_rank(model: *const EdgecModel, index: usize) -> i32 {
    with_model(model, -1, |m| m.model.inputs().get(index).map(|t| t.shape.len() as i32))
}

/// # Safety
/// `model` is NULL or from `edgec_model_load`.
#[no_mangle]
pub unsafe extern "C" fn edgec_model_output_rank(model: *const EdgecModel, index: usize) -> i32 {
    with_model(model, -1, |m| m.model.outputs().get(index).map(|t| t.shape.len() as i32))
}

/// Bytes per element of an `EDGEC_DTYPE_*`; 0 for an unknown code.
#[no_mangle]
pub extern "C" fn edgec_dtype_size(dtype: i32) -> usize {
    DType::from_code(dtype).map_or(0, DType::size)
}

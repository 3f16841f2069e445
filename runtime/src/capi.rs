//! The C API (`runtime/include/edgec.h`). Every function catches panics, so none unwinds into C.

use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use crate::format::DType;
use crate::{Model, TensorView};

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
        let mut shapes = Vec::with_capacity(in_desc.len());
        for (i, d) in in_desc.iter().enumerate() {
            let rank = d.rank as usize;
            if rank > EDGEC_MAX_RANK {
                return Err(format!("input {i}: rank {rank} is above {EDGEC_MAX_RANK}"));
            }
            let shape = d.shape[..rank].iter().map(|&v| usize::try_from(v)).collect::<Result<Vec<_>, _>>();
            shapes.push(shape.map_err(|_| format!("input {i}: negative dimension"))?);
        }
        for (i, t) in m.outputs().iter().enumerate() {
            if t.shape.len() > EDGEC_MAX_RANK {
                return Err(format!("output {i}: rank {} is above {EDGEC_MAX_RANK}", t.shape.len()));
            }
        }
        // Rust slices may not alias a mutable one: refuse overlapping output buffers.
        for (i, o) in out_desc.iter().enumerate() {
            let (a, b) = span(o);
            let others = in_desc.iter().chain(out_desc.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, d)| d));
            if a < b && others.map(span).any(|(c, d)| c < d && a < d && c < b) {
                return Err(format!("output {i}: buffer overlaps another input or output"));
            }
        }
        let mut views = Vec::with_capacity(in_desc.len());
        for (i, (d, shape)) in in_desc.iter().zip(&shapes).enumerate() {
            let dtype = DType::from_code(d.dtype).ok_or(format!("input {i}: unknown dtype code {}", d.dtype))?;
            let data: &[u8] = match (d.data.is_null(), d.byte_len) {
                (_, 0) => &[],
                (true, _) => return Err(format!("input {i}: data is NULL")),
                (false, n) => std::slice::from_raw_parts(d.data, n),
            };
            views.push(TensorView { dtype, shape, data });
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
        for ((j, shape), t) in out_shapes.iter().enumerate().zip(m.outputs()) {
            let d = &mut *outputs.add(j);
            d.dtype = t.dtype.code();
            d.rank = shape.len() as u32;
            d.shape = [0; EDGEC_MAX_RANK];
            for (dst, &v) in d.shape.iter_mut().zip(shape) {
                *dst = v as i64;
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

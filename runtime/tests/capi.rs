//! The C API, called from Rust and from a C program linked against the staticlib.

mod common;

use std::ffi::{c_char, CStr, CString};
use std::ptr::{null, null_mut};

use common::*;
use edgec_runtime::capi::*;

fn msg(buf: &[c_char]) -> String {
    unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned()
}

#[test]
fn load_failures_fill_the_error_buffer() {
    let mut err = [0 as c_char; 256];
    unsafe {
        assert!(edgec_model_load(null(), err.as_mut_ptr(), err.len()).is_null());
        assert_eq!(msg(&err), "path is NULL");
        let path = CString::new(write_tmp("capi-bad", b"not an artifact").to_str().unwrap()).unwrap();
        assert!(edgec_model_load(path.as_ptr(), err.as_mut_ptr(), err.len()).is_null());
        assert_eq!(msg(&err), "magic: not an edgec artifact");
        // A short buffer gets a cut, NUL-terminated message; no buffer at all is fine too.
        let mut short = [0x55 as c_char; 6];
        assert!(edgec_model_load(path.as_ptr(), short.as_mut_ptr(), short.len()).is_null());
        assert_eq!(msg(&short), "magic");
        assert!(edgec_model_load(path.as_ptr(), null_mut(), 0).is_null());
    }
}

#[test]
fn null_model_is_harmless() {
    let mut err = [0 as c_char; 64];
    unsafe {
        assert_eq!(edgec_model_input_count(null()), 0);
        assert!(edgec_model_output_name(null(), 0).is_null());
        assert_eq!(edgec_model_input_dtype(null(), 0), -1);
        assert_eq!(edgec_model_run(null(), null(), 0, null_mut(), 0, err.as_mut_ptr(), err.len()), -1);
        assert_eq!(msg(&err), "model is NULL");
        assert_eq!(edgec_model_set_threads(null_mut(), 2), -1);
        edgec_model_free(null_mut());
    }
    assert_eq!(edgec_dtype_size(6), 8);
    assert_eq!(edgec_dtype_size(0), 0);
}

#[cfg(target_arch = "x86_64")]
mod exec {
    use super::*;
    use std::path::PathBuf;
    use std::process::Command;

    fn tensor(dtype: i32, shape: &[i64], data: *mut u8, byte_len: usize) -> EdgecTensor {
        let mut s = [0i64; EDGEC_MAX_RANK];
        s[..shape.len()].copy_from_slice(shape);
        EdgecTensor { dtype, rank: shape.len() as u32, shape: s, data, byte_len }
    }

    struct Fixture {
        x: [f32; 4],
        mask: [i64; 4],
        flag: u8,
        y: [f32; 4],
        info: [i64; 3],
        z: [f32; 9],
    }

    impl Fixture {
        fn new() -> Fixture {
            Fixture { x: [1.0, 2.0, 3.0, 4.0], mask: [1; 4], flag: 1, y: [0.0; 4], info: [0; 3], z: [9.0; 9] }
        }

        fn descriptors(&mut self) -> ([EdgecTensor; 3], [EdgecTensor; 3]) {
            let ins = [
                tensor(1, &[1, 4], self.x.as_mut_ptr().cast(), 16),
                tensor(6, &[1, 4], self.mask.as_mut_ptr().cast(), 32),
                tensor(7, &[1], &mut self.flag, 1),
            ];
            let outs = [
                tensor(0, &[], self.y.as_mut_ptr().cast(), 16),
                tensor(0, &[], self.info.as_mut_ptr().cast(), 24),
                tensor(0, &[], self.z.as_mut_ptr().cast(), 36),
            ];
            (ins, outs)
        }
    }

    fn load() -> *mut EdgecModel {
        let path = CString::new(write_tmp("capi", &x86_artifact()).to_str().unwrap()).unwrap();
        let mut err = [0 as c_char; 256];
        let m = unsafe { edgec_model_load(path.as_ptr(), err.as_mut_ptr(), err.len()) };
        assert!(!m.is_null(), "{}", msg(&err));
        m
    }

    #[test]
    fn getters_and_run() {
        let m = load();
        let mut err = [0 as c_char; 256];
        let mut f = Fixture::new();
        unsafe {
            assert_eq!((edgec_model_input_count(m), edgec_model_output_count(m)), (3, 3));
            assert_eq!(CStr::from_ptr(edgec_model_input_name(m, 1)).to_str(), Ok("mask"));
            assert_eq!(CStr::from_ptr(edgec_model_output_name(m, 2)).to_str(), Ok("z"));
            assert!(edgec_model_input_name(m, 3).is_null());
            assert_eq!(edgec_model_input_dtype(m, 2), 7);
            assert_eq!(edgec_model_output_dtype(m, 1), 6);
            assert_eq!(edgec_model_input_rank(m, 0), 2);
            assert_eq!(edgec_model_output_rank(m, 9), -1);
            let (ins, mut outs) = f.descriptors();
            let rc = edgec_model_run(m, ins.as_ptr(), 3, outs.as_mut_ptr(), 3, err.as_mut_ptr(), err.len());
            assert_eq!(rc, 0, "{}", msg(&err));
            assert_eq!(msg(&err), "");
            assert_eq!((outs[0].dtype, outs[0].rank, &outs[0].shape[..2]), (1, 2, &[1, 4][..]));
            assert_eq!((outs[2].rank, outs[2].shape[0]), (1, 9));
            edgec_model_free(m);
        }
        assert_eq!(f.y, [1.5, 2.5, 3.5, 4.5]);
        assert_eq!(f.info, [4, 0, 0]);
        assert_eq!(f.z, [9.0; 9], "caller buffers hold only what the code writes (it never writes z)");
    }

    #[test]
    fn bad_descriptors_are_refused() {
        let m = load();
        let mut f = Fixture::new();
        let run = |ins: &[EdgecTensor], outs: &mut [EdgecTensor]| {
            let mut err = [0 as c_char; 256];
            let rc = unsafe {
                edgec_model_run(m, ins.as_ptr(), ins.len(), outs.as_mut_ptr(), outs.len(), err.as_mut_ptr(), err.len())
            };
            assert_eq!(rc, -1);
            msg(&err)
        };
        let (ins, mut outs) = f.descriptors();
        let mut bad = ins;
        bad[0].rank = 9;
        assert_eq!(run(&bad, &mut outs), "input 0: rank 9 is above 8");
        let mut bad = ins;
        bad[1].shape[1] = -4;
        assert_eq!(run(&bad, &mut outs), "input 1: negative dimension");
        let mut bad = ins;
        bad[2].dtype = 42;
        assert_eq!(run(&bad, &mut outs), "input 2: unknown dtype code 42");
        let mut bad = ins;
        bad[0].data = null_mut();
        assert_eq!(run(&bad, &mut outs), "input 0: data is NULL");
        assert_eq!(run(&ins[..2], &mut outs), "expected 3 inputs, got 2");
        let mut overlap = outs;
        overlap[1].data = overlap[0].data;
        assert_eq!(run(&ins, &mut overlap), "output 0: buffer overlaps another input or output");
        let mut onto_input = outs;
        onto_input[0].data = ins[0].data;
        assert_eq!(run(&ins, &mut onto_input), "output 0: buffer overlaps another input or output");
        let mut small = outs;
        small[2].byte_len = 8;
        assert_eq!(run(&ins, &mut small), "output `z`: buffer is 8 bytes, needs 36");
        assert_eq!(unsafe { edgec_model_run(m, null(), 3, outs.as_mut_ptr(), 3, null_mut(), 0) }, -1);
        unsafe { edgec_model_free(m) };
    }

    /// The staticlib that `cargo test` built next to this test binary.
    fn staticlib() -> PathBuf {
        let exe = std::env::current_exe().unwrap();
        let deps = exe.parent().unwrap();
        [deps.join("libedgec_runtime.a"), deps.parent().unwrap().join("libedgec_runtime.a")]
            .into_iter()
            .find(|p| p.exists())
            .expect("libedgec_runtime.a next to the test binary")
    }

    #[test]
    fn c_program_links_the_staticlib() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let exe = tmp_path("run_model").with_extension("bin");
        let cc = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
            .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-o"])
            .arg(&exe)
            .arg(root.join("tests/c/run_model.c"))
            .arg("-I")
            .arg(root.join("include"))
            .arg(staticlib())
            .args(["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl", "-lc"])
            .output()
            .expect("run cc");
        assert!(cc.status.success(), "cc failed:\n{}", String::from_utf8_lossy(&cc.stderr));
        let artifact = write_tmp("c-model", &x86_artifact());
        let run = Command::new(&exe).arg(&artifact).output().unwrap();
        let stdout = String::from_utf8_lossy(&run.stdout);
        assert!(run.status.success(), "{stdout}{}", String::from_utf8_lossy(&run.stderr));
        let expected = "\
inputs 3 outputs 3
input x dtype 1 rank 2
input mask dtype 6 rank 2
input flag dtype 7 rank 1
output y dtype 1 rank 2
output info dtype 6 rank 1
output z dtype 1 rank 1
y dtype 1 rank 2 shape 1 4: 1.5 2.5 3.5 4.5
info 4 0 0
z rank 1 shape 9, 4 bytes per element
error: input `x`: dtype i32, expected f32
ok
";
        assert_eq!(stdout, expected);
    }
}

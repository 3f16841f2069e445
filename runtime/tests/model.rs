//! Model::load and Model::run. Execution tests run the hand-assembled x86_64 entry, so they are
//! compiled on x86_64 only; the refusals run everywhere.

mod common;

use common::*;
use edgec_runtime::format::Arch;
use edgec_runtime::host::{check_features, host_feature_bits};
use edgec_runtime::{LoadError, Model};

fn load_err(bytes: &[u8]) -> LoadError {
    match Model::load(write_tmp("bad", bytes)) {
        Ok(_) => panic!("loaded an artifact that must be refused"),
        Err(e) => e,
    }
}

#[test]
fn missing_file_names_the_path() {
    let path = tmp_path("does-not-exist");
    let e = Model::load(&path).unwrap_err();
    assert!(matches!(e, LoadError::Io { .. }));
    assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}");
}

#[test]
fn foreign_architecture_is_refused() {
    let (triple, features) = if Arch::host() == Some(Arch::X86_64) { (ARM, 1) } else { (X86, 0) };
    let e = load_err(&artifact(triple, features));
    assert!(matches!(e, LoadError::WrongArch { .. }), "{e}");
    assert!(e.to_string().starts_with("target triple: the artifact is for"), "{e}");
}

#[test]
fn undefined_feature_bit_is_refused() {
    let mut b = x86_artifact();
    put_u64(&mut b, 80, 1 << 40);
    reseal(&mut b);
    assert!(matches!(load_err(&b), LoadError::Features(_)));
}

#[test]
fn missing_cpu_features_are_listed() {
    let e = check_features(Arch::X86_64, (1 << 6) | (1 << 7) | 1, 1).unwrap_err();
    assert_eq!(e.to_string(), "required CPU features: this x86_64 CPU lacks avx2, fma");
    assert!(check_features(Arch::Aarch64, 0b1011, 0b1111).is_ok());
}

#[test]
fn corrupt_and_truncated_files_are_refused() {
    let bytes = x86_artifact();
    for len in (0..bytes.len()).step_by(29) {
        load_err(&bytes[..len]);
    }
    let mut b = bytes.clone();
    let last = b.len() - 1;
    b[last] ^= 1;
    assert!(matches!(load_err(&b), LoadError::SectionChecksum(_)));
}

#[cfg(target_arch = "x86_64")]
mod exec {
    use super::*;
    use edgec_runtime::{DType, RunError, Tensor, TensorView};

    struct Inputs {
        x: Tensor,
        mask: Tensor,
        flag: Tensor,
    }

    fn inputs(n: usize) -> Inputs {
        let xs: Vec<f32> = (0..n).map(|i| i as f32).collect();
        Inputs {
            x: Tensor::from_slice(vec![1, n], &xs).unwrap(),
            mask: Tensor::from_slice(vec![1, n], &vec![1i64; n]).unwrap(),
            flag: Tensor::from_bytes(DType::Bool, vec![1], &[1]).unwrap(),
        }
    }

    impl Inputs {
        fn views(&self) -> Vec<TensorView<'_>> {
            vec![self.x.view(), self.mask.view(), self.flag.view()]
        }
    }

    fn model() -> Model {
        Model::load(write_tmp("model", &x86_artifact())).unwrap()
    }

    fn check_outputs(out: &[Tensor], n: usize) {
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].shape(), &[1, n]);
        let want: Vec<f32> = (0..n).map(|i| i as f32 + BIAS).collect();
        assert_eq!(out[0].as_slice::<f32>().unwrap(), want.as_slice());
        // n, arena % 64, weights % 64.
        assert_eq!(out[1].as_slice::<i64>().unwrap(), &[n as i64, 0, 0]);
        assert_eq!(out[2].shape(), &[2 * n + 1]);
        assert!(out[2].as_slice::<f32>().unwrap().iter().all(|&v| v == 0.0));
    }

    #[test]
    fn runs_and_reuses_the_arena() {
        let m = model();
        assert_eq!(m.meta().model_name, "add_bias");
        assert_eq!(m.inputs().iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["x", "mask", "flag"]);
        assert_eq!(m.outputs()[1].dtype, DType::I64);
        assert_eq!(m.triple(), X86);
        for n in [4, 16, 1, 7] {
            check_outputs(&m.run(&inputs(n).views()).unwrap(), n);
        }
    }

    #[test]
    fn runs_with_required_features_the_cpu_has() {
        let have = host_feature_bits() & 0b11; // sse3, ssse3 on any x86_64 built this century
        let m = Model::load(write_tmp("features", &artifact(X86, have))).unwrap();
        assert_eq!(m.features(), have);
        check_outputs(&m.run(&inputs(3).views()).unwrap(), 3);
    }

    #[test]
    fn run_into_caller_buffers() {
        let m = model();
        let ins = inputs(5);
        let (mut y, mut info, mut z) = (vec![0f32; 8], [0i64; 3], vec![1f32; 11]);
        let shapes = {
            let as_bytes =
                |v: &mut [f32]| unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), v.len() * 4) };
            let info_bytes = unsafe { std::slice::from_raw_parts_mut(info.as_mut_ptr().cast::<u8>(), 24) };
            let mut bufs = [as_bytes(&mut y), info_bytes, as_bytes(&mut z)];
            m.run_into(&ins.views(), &mut bufs).unwrap()
        };
        assert_eq!(shapes, vec![vec![1, 5], vec![3], vec![11]]);
        assert_eq!(&y[..5], &[0.5, 1.5, 2.5, 3.5, 4.5]);
        assert_eq!(info, [5, 0, 0]);
        let mut small = [0u8; 8];
        let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
        let e = m.run_into(&ins.views(), &mut [&mut small[..], &mut a[..], &mut b[..]]).unwrap_err();
        assert_eq!(e.to_string(), "output `y`: buffer is 8 bytes, needs 20");
        let e = m.run_into(&ins.views(), &mut [&mut a[..]]).unwrap_err();
        assert!(matches!(e, RunError::OutputCount { expected: 3, got: 1 }));
    }

    #[test]
    fn concurrent_runs_take_turns() {
        let m = std::sync::Arc::new(model());
        let threads: Vec<_> = (1..=8)
            .map(|n| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        check_outputs(&m.run(&inputs(n).views()).unwrap(), n);
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
    }

    fn run_err(m: &Model, views: &[TensorView<'_>]) -> String {
        m.run(views).unwrap_err().to_string()
    }

    #[test]
    fn bad_inputs_are_refused() {
        let m = model();
        let ok = inputs(4);
        let v = ok.views();
        assert_eq!(run_err(&m, &v[..2]), "expected 3 inputs, got 2");
        let x64 = Tensor::from_slice(vec![1, 4], &[0f64; 4]).unwrap();
        assert_eq!(run_err(&m, &[x64.view(), v[1], v[2]]), "input `x`: dtype f64, expected f32");
        let flat = Tensor::from_slice(vec![4], &[0f32; 4]).unwrap();
        assert_eq!(run_err(&m, &[flat.view(), v[1], v[2]]), "input `x`: rank 1, expected 2");
        let two = Tensor::from_slice(vec![2, 4], &[0f32; 8]).unwrap();
        assert_eq!(run_err(&m, &[two.view(), v[1], v[2]]), "input `x` axis 0: size 2, expected 1");
        let other = inputs(5);
        assert_eq!(
            run_err(&m, &[v[0], other.mask.view(), v[2]]),
            "input `mask`: symbol `n` is 5 here but 4 in input `x`"
        );
        let short = TensorView { dtype: DType::F32, shape: &[1, 4], data: &ok.x.bytes()[..12] };
        assert_eq!(run_err(&m, &[short, v[1], v[2]]), "input `x`: 12 data bytes, its shape needs 16");
        let huge = TensorView { dtype: DType::F32, shape: &[1, usize::MAX], data: &[] };
        assert!(run_err(&m, &[huge, v[1], v[2]]).contains("more than memory can address"));
        let unaligned = TensorView { dtype: DType::F32, shape: &[1, 4], data: &ok.mask.bytes()[1..17] };
        assert_eq!(run_err(&m, &[unaligned, v[1], v[2]]), "input `x`: data is not aligned to its 4-byte elements");
        let two_bool = Tensor::from_bytes(DType::Bool, vec![1], &[2]).unwrap();
        assert_eq!(run_err(&m, &[v[0], v[1], two_bool.view()]), "input `flag`: bool byte 2 at index 0 is not 0 or 1");
    }

    #[test]
    fn symbols_outside_their_range_are_refused() {
        let m = model();
        let over = inputs(MAX_N as usize + 1);
        assert_eq!(run_err(&m, &over.views()), "symbol `n` = 17 is outside 0..=16");
        // The model still works afterwards.
        check_outputs(&m.run(&inputs(2).views()).unwrap(), 2);
    }
}

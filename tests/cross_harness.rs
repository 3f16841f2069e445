//! The cross-execution plumbing (tests/common/qemu.rs, tests/harness/run_code.c) proven without
//! the code generator: hand-assembled entry functions for x86_64 (run natively), aarch64 and
//! riscv64 (run under qemu-user), wrapped in real `.edgec` artifacts.
//!
//! Fails, never skips, when qemu or the cross compilers are missing: run scripts/setup-cross.sh.

mod common;

use std::time::Instant;

use common::qemu::{harness, run_jobs, CrossArch, Job};
use edgec_runtime::format::Symbol;
use edgec_runtime::{ArtifactWriter, DType, Dim, Meta, TensorMeta};

// Every CODE section below holds three functions of `void f(const EdgecCall *call)`:
//   trap      at 0: an undefined instruction (SIGILL), so a wrong entry offset cannot pass;
//   add_word  y[0] = x[0] + weights[0] + (i32)symbols[0] + arena[0]   (32-bit words, wrapping;
//             the arena is zeroed, so its word is 0);
//   overrun   writes the 32-bit word after the end of a 4-byte output[0].
// EdgecCall field offsets: inputs 0, outputs 8, weights 16, arena 24, symbols 32.
// Encodings checked against `<cross>-gcc -c` + `<cross>-objdump -d` (riscv64 with .option norvc).

/// aarch64 (AAPCS64: call in x0).
const AARCH64_CODE: [u32; 21] = [
    0x0000_0000, // 0x00 trap:     udf #0
    0xf940_0001, // 0x04 add_word: ldr x1, [x0]         ; call->inputs
    0xf940_0021, // 0x08           ldr x1, [x1]         ; inputs[0]
    0xb940_0021, // 0x0c           ldr w1, [x1]         ; x[0]
    0xf940_0802, // 0x10           ldr x2, [x0, #16]    ; call->weights
    0xb940_0042, // 0x14           ldr w2, [x2]
    0x0b02_0021, // 0x18           add w1, w1, w2
    0xf940_1002, // 0x1c           ldr x2, [x0, #32]    ; call->symbols
    0xf940_0042, // 0x20           ldr x2, [x2]         ; symbols[0]
    0x0b02_0021, // 0x24           add w1, w1, w2
    0xf940_0c02, // 0x28           ldr x2, [x0, #24]    ; call->arena
    0xb940_0042, // 0x2c           ldr w2, [x2]
    0x0b02_0021, // 0x30           add w1, w1, w2
    0xf940_0402, // 0x34           ldr x2, [x0, #8]     ; call->outputs
    0xf940_0042, // 0x38           ldr x2, [x2]         ; outputs[0]
    0xb900_0041, // 0x3c           str w1, [x2]
    0xd65f_03c0, // 0x40           ret
    0xf940_0401, // 0x44 overrun:  ldr x1, [x0, #8]     ; call->outputs
    0xf940_0021, // 0x48           ldr x1, [x1]         ; outputs[0]
    0xb900_043f, // 0x4c           str wzr, [x1, #4]
    0xd65f_03c0, // 0x50           ret
];

/// riscv64 (LP64D: call in a0), uncompressed instructions.
const RISCV64_CODE: [u32; 21] = [
    0xc000_1073, // 0x00 trap:     unimp
    0x0005_3583, // 0x04 add_word: ld   a1, 0(a0)       ; call->inputs
    0x0005_b583, // 0x08           ld   a1, 0(a1)       ; inputs[0]
    0x0005_a583, // 0x0c           lw   a1, 0(a1)       ; x[0]
    0x0105_3603, // 0x10           ld   a2, 16(a0)      ; call->weights
    0x0006_2603, // 0x14           lw   a2, 0(a2)
    0x00c5_85bb, // 0x18           addw a1, a1, a2
    0x0205_3603, // 0x1c           ld   a2, 32(a0)      ; call->symbols
    0x0006_3603, // 0x20           ld   a2, 0(a2)       ; symbols[0]
    0x00c5_85bb, // 0x24           addw a1, a1, a2
    0x0185_3603, // 0x28           ld   a2, 24(a0)      ; call->arena
    0x0006_2603, // 0x2c           lw   a2, 0(a2)
    0x00c5_85bb, // 0x30           addw a1, a1, a2
    0x0085_3603, // 0x34           ld   a2, 8(a0)       ; call->outputs
    0x0006_3603, // 0x38           ld   a2, 0(a2)       ; outputs[0]
    0x00b6_2023, // 0x3c           sw   a1, 0(a2)
    0x0000_8067, // 0x40           ret
    0x0085_3583, // 0x44 overrun:  ld   a1, 8(a0)       ; call->outputs
    0x0005_b583, // 0x48           ld   a1, 0(a1)       ; outputs[0]
    0x0005_a223, // 0x4c           sw   zero, 4(a1)
    0x0000_8067, // 0x50           ret
];

/// x86_64 (System V: call in rdi).
#[rustfmt::skip]
const X86_64_CODE: [u8; 0x35] = [
    0x0f, 0x0b,                               // 0x00 trap:     ud2
    0x48, 0x8b, 0x07,                         // 0x02 add_word: mov rax, [rdi]       ; call->inputs
    0x48, 0x8b, 0x00,                         // 0x05           mov rax, [rax]       ; inputs[0]
    0x8b, 0x00,                               // 0x08           mov eax, [rax]       ; x[0]
    0x48, 0x8b, 0x4f, 0x10,                   // 0x0a           mov rcx, [rdi+16]    ; call->weights
    0x03, 0x01,                               // 0x0e           add eax, [rcx]
    0x48, 0x8b, 0x4f, 0x20,                   // 0x10           mov rcx, [rdi+32]    ; call->symbols
    0x03, 0x01,                               // 0x14           add eax, [rcx]       ; low half of symbols[0]
    0x48, 0x8b, 0x4f, 0x18,                   // 0x16           mov rcx, [rdi+24]    ; call->arena
    0x03, 0x01,                               // 0x1a           add eax, [rcx]
    0x48, 0x8b, 0x4f, 0x08,                   // 0x1c           mov rcx, [rdi+8]     ; call->outputs
    0x48, 0x8b, 0x09,                         // 0x20           mov rcx, [rcx]       ; outputs[0]
    0x89, 0x01,                               // 0x23           mov [rcx], eax
    0xc3,                                     // 0x25           ret
    0x48, 0x8b, 0x47, 0x08,                   // 0x26 overrun:  mov rax, [rdi+8]     ; call->outputs
    0x48, 0x8b, 0x00,                         // 0x2a           mov rax, [rax]       ; outputs[0]
    0xc7, 0x40, 0x04, 0x00, 0x00, 0x00, 0x00, // 0x2d           mov dword [rax+4], 0
    0xc3,                                     // 0x34           ret
];

#[derive(Clone, Copy)]
enum Func {
    Trap,
    AddWord,
    Overrun,
}

/// (CODE bytes, entry offset of `func`).
fn code(arch: CrossArch, func: Func) -> (Vec<u8>, u64) {
    let words = |w: &[u32]| w.iter().flat_map(|i| i.to_le_bytes()).collect::<Vec<u8>>();
    let (bytes, offsets) = match arch {
        CrossArch::Host => {
            assert_eq!(std::env::consts::ARCH, "x86_64", "the host test code is x86_64");
            (X86_64_CODE.to_vec(), [0, 0x02, 0x26])
        }
        CrossArch::Aarch64 => (words(&AARCH64_CODE), [0, 0x04, 0x44]),
        CrossArch::Riscv64 => (words(&RISCV64_CODE), [0, 0x04, 0x44]),
    };
    (bytes, offsets[func as usize])
}

/// An artifact with x: i32[n] in, y: i32[1] out, and `weight` as the first WEIGHTS word.
fn artifact(arch: CrossArch, func: Func, weight: i32) -> Vec<u8> {
    let (code, entry_offset) = code(arch, func);
    let meta = Meta {
        model_name: "add_word".into(),
        symbols: vec![Symbol { name: "n".into(), max: 1024 }],
        inputs: vec![TensorMeta { name: "x".into(), dtype: DType::I32, shape: vec![Dim::symbol("n")] }],
        outputs: vec![TensorMeta { name: "y".into(), dtype: DType::I32, shape: vec![Dim::constant(1)] }],
        arena_bytes: 256,
        entry_offset,
        compile_options: Default::default(),
        kv_cache: Vec::new(),
        requires: Vec::new(),
    };
    // The weight, then bytes that must not matter.
    let mut weights = weight.to_le_bytes().to_vec();
    weights.extend_from_slice(&[0x5a; 60]);
    let features = arch.arch().mandatory_bits();
    ArtifactWriter::new(arch.triple(), features, &meta, &code, &weights).to_bytes().unwrap()
}

/// A job of `func` with x = [x0, x0+1, ..] of length n.
fn job(arch: CrossArch, func: Func, name: &str, x0: i32, weight: i32, n: i64) -> Job {
    let x: Vec<u8> = (0..n as i32).flat_map(|i| x0.wrapping_add(i).to_le_bytes()).collect();
    Job {
        name: name.into(),
        artifact: artifact(arch, func, weight),
        symbols: vec![n],
        inputs: vec![x],
        output_sizes: vec![4],
        parallel_chunk: None,
    }
}

/// Cases (x0, weight, n) covering signs and 32-bit wrap-around.
const CASES: [(i32, i32, i64); 5] =
    [(1, 2, 1), (-100, 7, 3), (i32::MAX, 1, 1), (i32::MIN, -1, 2), (0x1234_5678, -0x0765_4321, 1000)];

fn expected(x0: i32, weight: i32, n: i64) -> i32 {
    x0.wrapping_add(weight).wrapping_add(n as i32)
}

fn check_add_word(arch: CrossArch, cpu: Option<&str>) {
    let jobs: Vec<Job> = CASES
        .iter()
        .enumerate()
        .map(|(i, &(x0, w, n))| job(arch, Func::AddWord, &format!("add_word {i}"), x0, w, n))
        .collect();
    let start = Instant::now();
    let outputs = run_jobs(arch, &jobs, cpu).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{} (cpu {cpu:?}): {} jobs in {:?}", arch.name(), jobs.len(), start.elapsed());
    assert_eq!(outputs.len(), jobs.len());
    for (out, &(x0, w, n)) in outputs.iter().zip(&CASES) {
        assert_eq!(out.len(), 1);
        let got = i32::from_le_bytes(out[0].as_slice().try_into().unwrap());
        assert_eq!(got, expected(x0, w, n), "{} x0={x0} w={w} n={n}", arch.name());
    }
}

#[test]
fn host_add_word() {
    check_add_word(CrossArch::Host, None);
}

#[test]
fn aarch64_add_word() {
    check_add_word(CrossArch::Aarch64, None);
    check_add_word(CrossArch::Aarch64, CrossArch::Aarch64.cpu_all_features());
}

#[test]
fn riscv64_add_word() {
    check_add_word(CrossArch::Riscv64, None);
    check_add_word(CrossArch::Riscv64, CrossArch::Riscv64.cpu_all_features());
}

/// Hundreds of jobs share one emulator process.
#[test]
fn many_jobs_in_one_process() {
    for arch in CrossArch::CROSS {
        let cases: Vec<(i32, i32, i64)> = (0..300).map(|i| (i * 1000 - 7, -3 * i, (i % 17 + 1) as i64)).collect();
        let jobs: Vec<Job> = cases
            .iter()
            .enumerate()
            .map(|(i, &(x, w, n))| job(arch, Func::AddWord, &format!("j{i}"), x, w, n))
            .collect();
        let start = Instant::now();
        let outputs = run_jobs(arch, &jobs, arch.cpu_all_features()).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("{}: {} jobs in {:?}", arch.name(), jobs.len(), start.elapsed());
        for (out, &(x, w, n)) in outputs.iter().zip(&cases) {
            assert_eq!(out[0], expected(x, w, n).to_le_bytes());
        }
    }
}

/// A crash names its job and the last job that finished; an overrun fails only its job.
#[test]
fn crash_and_overrun_are_reported() {
    for arch in [CrossArch::Host, CrossArch::Aarch64, CrossArch::Riscv64] {
        let name = arch.name();
        let jobs = [job(arch, Func::AddWord, "first", 1, 2, 1), job(arch, Func::Trap, "trap", 0, 0, 1)];
        let err = run_jobs(arch, &jobs, None).unwrap_err();
        assert!(err.contains("crash trap: SIGILL"), "{name}: {err}");
        assert!(err.contains("last ok job: `first`"), "{name}: {err}");
        eprintln!("{err}");

        let jobs = [
            job(arch, Func::AddWord, "first", 1, 2, 1),
            job(arch, Func::Overrun, "overrun", 0, 0, 1),
            job(arch, Func::AddWord, "third", 1, 2, 1),
        ];
        let err = run_jobs(arch, &jobs, None).unwrap_err();
        assert!(err.contains("fail overrun: output 0 (4 bytes): byte 0 past its end was written"), "{name}: {err}");
        assert!(!err.contains("third"), "{name}: the job after a failed one still runs: {err}");
        eprintln!("{err}");
    }
}

/// The harness checks the job against its artifact before starting anything.
#[test]
fn mismatched_jobs_are_refused() {
    let mut j = job(CrossArch::Aarch64, Func::AddWord, "aarch64 code", 1, 2, 1);
    let err = run_jobs(CrossArch::Riscv64, std::slice::from_ref(&j), None).unwrap_err();
    assert!(err.contains("the artifact is for aarch64, this run is riscv64"), "{err}");
    j.symbols = vec![2];
    let err = run_jobs(CrossArch::Aarch64, std::slice::from_ref(&j), None).unwrap_err();
    assert!(err.contains("input `x` has 4 bytes, META says 8"), "{err}");
    j.symbols = vec![1];
    j.output_sizes = vec![8];
    let err = run_jobs(CrossArch::Aarch64, std::slice::from_ref(&j), None).unwrap_err();
    assert!(err.contains("output `y` size 8, META says 4"), "{err}");
}

/// The C harness's own parser and checks, run natively on hand-written job files.
#[test]
fn harness_rejects_bad_job_files() {
    let exe = harness(CrossArch::Host).unwrap();
    let dir = std::env::temp_dir().join(format!("edgec-cross-harness-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (code, entry) = code(CrossArch::Host, Func::AddWord);
    let code_path = dir.join("code");
    std::fs::write(&code_path, &code).unwrap();
    let input = dir.join("in");
    std::fs::write(&input, 5i32.to_le_bytes()).unwrap();
    let weights = dir.join("w");
    std::fs::write(&weights, 10i32.to_le_bytes()).unwrap();
    let out = dir.join("out with space");
    let (c, i, w, o) = (code_path.display(), input.display(), weights.display(), out.display());
    let good = format!(
        "# comment\n\njob good one\ncode {c}\nentry {entry}\nweights {w}\narena 0\nsymbols 1 -3\ninput {i}\noutput 4 {o}\nend\n"
    );
    let run = |text: &str| {
        let jobs = dir.join("jobs.txt");
        std::fs::write(&jobs, text).unwrap();
        let r = std::process::Command::new(&exe).arg(&jobs).output().unwrap();
        (r.status.code(), String::from_utf8_lossy(&r.stdout).into_owned())
    };

    assert_eq!(run(&good), (Some(0), "ok good one\n".to_string()));
    assert_eq!(std::fs::read(&out).unwrap(), 12i32.to_le_bytes(), "5 + 10 - 3 + 0");

    let bad: &[(&str, &str)] = &[
        ("bogus 1\n", "unknown keyword `bogus`"),
        ("job x\ncode /nonexistent/code\nend\n", "cannot open /nonexistent/code"),
        ("code x\n", "`code` outside a job"),
        ("job x\n", "the last job has no `end`"),
        ("job x\nend\n", "job without `code`"),
        ("job x\nentry 1\nentry 2\n", "duplicate `entry`"),
        ("job x\nentry -1\n", "bad number in `-1`"),
        ("job x\narena 99999999999999999999\n", "number `99999999999999999999` is too large"),
        ("job x\nsymbols 2 1\n", "`symbols`: fewer values than the count"),
        ("job x\nsymbols 1 1 2\n", "`symbols`: more values than the count"),
        ("job x\nsymbols 1 9223372036854775808\n", "out of range"),
        ("job x\noutput 4\n", "`output BYTES` needs an argument"),
        ("job x\njob y\n", "`job` before the previous job's `end`"),
    ];
    for (text, want) in bad {
        let (status, stdout) = run(text);
        assert_eq!(status, Some(2), "{text:?}: {stdout}");
        assert!(stdout.starts_with("error ") && stdout.contains(want), "{text:?}: {stdout}");
    }
    let (status, stdout) = run(&format!("job x\ncode {c}\nentry {}\nend\n", code.len()));
    assert_eq!(status, Some(2));
    assert!(stdout.contains(&format!("error x: entry {} is not inside the {0}-byte code", code.len())), "{stdout}");
    // An empty weights file and a zero arena still give the code valid (64-byte) blocks.
    let empty = dir.join("empty");
    std::fs::write(&empty, b"").unwrap();
    let text = good.replace(&format!("weights {w}"), &format!("weights {}", empty.display()));
    assert_eq!(run(&text), (Some(0), "ok good one\n".to_string()));
    assert_eq!(std::fs::read(&out).unwrap(), 2i32.to_le_bytes(), "5 + 0 - 3 + 0");
    std::fs::remove_dir_all(&dir).unwrap();
}

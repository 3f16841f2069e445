//! The ONNX backend node tests, generated from the onnx wheel by
//! `scripts/gen-conformance.sh` into data/onnx-node/.
//!
//! Every case whose ops the importer supports runs through the reference
//! interpreter twice: as imported, and after the default pass pipeline (so
//! constant folding, CSE and DCE are checked on ~1000 graphs too). Outputs are
//! compared with the ONNX backend's default tolerance (rtol 1e-3, atol 1e-7).
//! Cases that are known to fail are listed, each with a reason, in
//! tests/conformance/exclusions.txt; a listed case that passes fails the test
//! too, so the list stays exact.

mod common;

use common::native;
use common::qemu::{run_jobs, CrossArch, Job};

use edgec::interp::Interpreter;
use edgec::ir::{Graph, Tensor};
use edgec::onnx::proto::TensorProto;
use edgec::passes::PassManager;
use edgec::Error;
use prost::Message;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const RTOL: f64 = 1e-3;
const ATOL: f64 = 1e-7;

fn data_dir() -> PathBuf {
    std::env::var_os("EDGEC_ONNX_NODE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| common::repo_root().join("data/onnx-node"))
}

/// Exclusion patterns (`*` wildcard) with their reasons, from one of the lists in tests/conformance.
fn exclusions(file: &str) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(common::repo_root().join("tests/conformance").join(file)).unwrap();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (pat, reason) = l.split_once('#').unwrap_or_else(|| panic!("exclusion '{l}' needs '# reason'"));
            (pat.trim().to_string(), reason.trim().to_string())
        })
        .collect()
}

fn glob_match(pat: &str, s: &str) -> bool {
    match pat.split_once('*') {
        None => pat == s,
        Some((head, tail)) => {
            s.starts_with(head) && (0..=s.len() - head.len()).any(|i| glob_match(tail, &s[head.len() + i..]))
        }
    }
}

fn read_pb(path: &Path) -> Result<Tensor, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let t = TensorProto::decode(&bytes[..]).map_err(|e| format!("{}: {e}", path.display()))?;
    edgec::onnx::tensor::tensor_from_proto(&t, None)
}

fn numbered(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    (0..).map(|i| dir.join(format!("{prefix}_{i}.pb"))).take_while(|p| p.exists()).collect()
}

fn run_graph(g: &Graph, inputs: &[Tensor]) -> Result<Vec<Tensor>, String> {
    let names: Vec<String> = g.inputs.iter().map(|&n| g.g[n].outputs[0].name.clone()).collect();
    if names.len() != inputs.len() {
        return Err(format!("{} inputs in test data, {} in the graph", inputs.len(), names.len()));
    }
    let feeds: Vec<(String, Tensor)> = names.into_iter().zip(inputs.iter().cloned()).collect();
    let interp = Interpreter::new(g).map_err(|e| e.to_string())?;
    Ok(interp.run(&feeds).map_err(|e| e.to_string())?.into_iter().map(|(_, t)| t).collect())
}

enum Outcome {
    Unsupported(String),
    /// Passed in the interpreter and natively on this machine; the cross-target jobs still have to
    /// run (with the interpreter's outputs to compare against).
    Pass(Vec<Job>, Vec<Tensor>),
    Fail(String),
    /// The interpreter passed; compiling or running native code did not.
    NativeFail(String),
}

/// A case to run under qemu: name, job, the interpreter's outputs.
type CrossCase = (String, Job, Vec<Tensor>);

/// Native code vs the reference interpreter.
const NATIVE_RTOL: f64 = 1e-4;
const NATIVE_ATOL: f64 = 1e-5;

fn run_case(dir: &Path) -> Outcome {
    let g = match edgec::onnx::load_model(&dir.join("model.onnx")) {
        Ok(g) => g,
        Err(Error::Unsupported(u)) => {
            let mut ops: Vec<String> = u.iter().map(|u| u.op.clone()).collect();
            ops.dedup();
            return Outcome::Unsupported(ops.join(","));
        }
        Err(e) => return Outcome::Fail(format!("import: {e}")),
    };
    let set = dir.join("test_data_set_0");
    let inputs: Result<Vec<Tensor>, String> = numbered(&set, "input").iter().map(|p| read_pb(p)).collect();
    let expected: Result<Vec<Tensor>, String> = numbered(&set, "output").iter().map(|p| read_pb(p)).collect();
    let (inputs, expected) = match (inputs, expected) {
        (Ok(i), Ok(e)) => (i, e),
        (Err(e), _) | (_, Err(e)) => return Outcome::Unsupported(format!("test data: {e}")),
    };
    let mut optimized = g.clone();
    let variants = match PassManager::default_pipeline().run(&mut optimized, &mut |_, _, _| {}) {
        Ok(_) => vec![("as imported", g), ("after passes", optimized)],
        Err(e) => return Outcome::Fail(format!("passes: {e}")),
    };
    for (label, graph) in &variants {
        let got = match run_graph(graph, &inputs) {
            Ok(o) => o,
            Err(e) => return Outcome::Fail(format!("{label}: {e}")),
        };
        if got.len() != expected.len() {
            return Outcome::Fail(format!("{label}: {} outputs, expected {}", got.len(), expected.len()));
        }
        for (i, (g, w)) in got.iter().zip(&expected).enumerate() {
            if let Err(e) = common::compare(g, w, RTOL, ATOL) {
                return Outcome::Fail(format!("{label}: output {i}: {e}"));
            }
        }
    }
    // Native code for the optimized graph, against the interpreter on the same graph. Inputs that
    // only shape the computation (axes, bounds) are frozen to the test's values first, as a user
    // compiling such a model would.
    let mut graph = variants[1].1.clone();
    let mut inputs = inputs;
    let frozen = edgec::codegen::shape_parameter_inputs(&graph);
    if !frozen.is_empty() {
        let names = native::input_names(&graph);
        for f in &frozen {
            let i = names.iter().position(|n| n == f).unwrap();
            graph.freeze_input(f, &inputs[i]).unwrap();
        }
        inputs = names.iter().zip(inputs).filter(|(n, _)| !frozen.contains(n)).map(|(_, t)| t).collect();
        if let Err(e) = PassManager::default_pipeline().run(&mut graph, &mut |_, _, _| {}) {
            return Outcome::Fail(format!("passes after freezing {frozen:?}: {e}"));
        }
    }
    let graph = &graph;
    let reference = run_graph(graph, &inputs).expect("ran above");
    let name = dir.file_name().unwrap().to_string_lossy().to_string();
    for target in ["host", "x86_64"] {
        let got = match native::run_native(graph, &inputs, target) {
            Ok((_, o)) => o,
            Err(e) => return Outcome::NativeFail(format!("native {target}: {e}")),
        };
        for (i, (g, w)) in got.iter().zip(&reference).enumerate() {
            if let Err(e) = common::compare(g, w, NATIVE_RTOL, NATIVE_ATOL) {
                return Outcome::NativeFail(format!("native {target}: output {i}: {e}"));
            }
        }
    }
    let mut jobs = Vec::new();
    for arch in CrossArch::CROSS {
        match native::cross_job(&name, graph, &inputs, &reference, arch.name()) {
            Ok(j) => jobs.push(j),
            Err(e) => return Outcome::NativeFail(e),
        }
    }
    Outcome::Pass(jobs, reference)
}

/// The op a case tests: the longest supported op type that prefixes the case
/// name with underscores dropped (test_reduce_mean_... -> ReduceMean).
fn case_op(case: &str) -> String {
    let name = case.trim_start_matches("test_").replace('_', "").to_lowercase();
    // Case names that spell the op differently.
    let aliases = [
        ("lessequal", "LessOrEqual"),
        ("greaterequal", "GreaterOrEqual"),
        ("tril", "Trilu"),
        ("triu", "Trilu"),
        ("trainingdropout", "Dropout"),
    ];
    if let Some((_, op)) = aliases.iter().find(|(a, _)| name.starts_with(a)) {
        return op.to_string();
    }
    edgec::onnx::ops::SUPPORTED_OPS
        .iter()
        .filter(|op| name.starts_with(&op.to_lowercase()))
        .max_by_key(|op| op.len())
        .map(|s| s.to_string())
        // Function ops run through their expansion: group by the case's first word.
        .unwrap_or_else(|| format!("{} (expanded)", case.trim_start_matches("test_").split('_').next().unwrap_or(case)))
}

#[test]
fn onnx_node_conformance() {
    let dir = data_dir();
    assert!(
        dir.join(".complete").exists(),
        "ONNX conformance data missing at {}: run scripts/gen-conformance.sh (the README's test command does)",
        dir.display()
    );
    let excl = exclusions("exclusions.txt");
    let native_excl = exclusions("native-exclusions.txt");
    let mut native_excluded = 0;
    let mut cases: Vec<PathBuf> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    cases.sort();
    let mut per_op: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let (mut passed, mut unsupported, mut excluded) = (0, 0, 0);
    let mut problems = Vec::new();
    let mut used_patterns = std::collections::HashSet::new();
    let mut unsupported_ops: BTreeMap<String, usize> = BTreeMap::new();
    let mut cross: BTreeMap<&str, Vec<CrossCase>> = BTreeMap::new();
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let exclusion = excl.iter().find(|(p, _)| glob_match(p, &name));
        if std::env::var_os("EDGEC_CONFORMANCE_VERBOSE").is_some() {
            eprint!("{name} ... ");
        }
        let t0 = std::time::Instant::now();
        let outcome = run_case(case);
        if std::env::var_os("EDGEC_CONFORMANCE_VERBOSE").is_some() {
            eprintln!("{:.0} ms", t0.elapsed().as_secs_f64() * 1e3);
        }
        if let Some((p, _)) = exclusion {
            used_patterns.insert(p.clone());
        }
        let native_exclusion = native_excl.iter().find(|(p, _)| glob_match(p, &name));
        if let Some((p, _)) = native_exclusion {
            used_patterns.insert(p.clone());
        }
        let outcome = match (outcome, native_exclusion) {
            (Outcome::NativeFail(_), Some(_)) => {
                native_excluded += 1;
                Outcome::Pass(Vec::new(), Vec::new())
            }
            (Outcome::NativeFail(msg), None) => Outcome::Fail(msg),
            (Outcome::Pass(..), Some((p, _))) => {
                problems.push(format!(
                    "{name}: compiles and passes natively but is listed in native-exclusions.txt ('{p}')"
                ));
                Outcome::Pass(Vec::new(), Vec::new())
            }
            (o, _) => o,
        };
        match (outcome, exclusion) {
            (Outcome::Unsupported(ops), _) => {
                unsupported += 1;
                *unsupported_ops.entry(ops).or_default() += 1;
            }
            (Outcome::Pass(jobs, reference), None) => {
                passed += 1;
                for (arch, job) in CrossArch::CROSS.iter().zip(jobs) {
                    cross.entry(arch.name()).or_default().push((name.clone(), job, reference.clone()));
                }
                let e = per_op.entry(case_op(&name)).or_default();
                e.0 += 1;
                e.1 += 1;
            }
            (Outcome::Pass(..), Some((p, _))) => {
                problems.push(format!("{name}: passes but is excluded by '{p}': remove the exclusion"))
            }
            (Outcome::Fail(msg), None) => {
                per_op.entry(case_op(&name)).or_default().1 += 1;
                problems.push(format!("{name}: {msg}"));
            }
            (Outcome::NativeFail(_), _) => unreachable!("resolved above"),
            (Outcome::Fail(_), Some(_)) => {
                excluded += 1;
                per_op.entry(case_op(&name)).or_default().1 += 1;
            }
        }
    }
    // Every natively passing case also runs under qemu: one process per architecture.
    let mut cross_summary = String::new();
    for arch in CrossArch::CROSS {
        let cases = cross.remove(arch.name()).unwrap_or_default();
        let jobs: Vec<Job> = cases.iter().map(|c| c.1.clone()).collect();
        let t0 = std::time::Instant::now();
        match run_jobs(arch, &jobs, None) {
            Err(e) => problems.push(format!("qemu {}: {e}", arch.name())),
            Ok(outs) => {
                let mut ok = 0;
                for ((name, _, reference), raw) in cases.iter().zip(outs) {
                    let got = native::decode_outputs(&raw, reference).unwrap();
                    match got
                        .iter()
                        .zip(reference)
                        .try_for_each(|(g, w)| common::compare(g, w, NATIVE_RTOL, NATIVE_ATOL))
                    {
                        Ok(()) => ok += 1,
                        Err(e) => problems.push(format!("{name}: {} under qemu: {e}", arch.name())),
                    }
                }
                cross_summary.push_str(&format!(
                    "{}: {ok}/{} cases match the interpreter under qemu ({:.1} s)\n",
                    arch.name(),
                    cases.len(),
                    t0.elapsed().as_secs_f64()
                ));
            }
        }
    }
    for (p, _) in excl.iter().chain(&native_excl) {
        if !used_patterns.contains(p) {
            problems.push(format!("exclusion '{p}' matches no failing case: remove it"));
        }
    }
    let mut report = String::from("| op | passed | supported cases |\n|---|---|---|\n");
    for (op, (p, n)) in &per_op {
        report.push_str(&format!("| {op} | {p} | {n} |\n"));
    }
    report.push_str(&format!(
        "\n{} cases: {passed} passed, {excluded} excluded (listed with reasons), {unsupported} use unsupported ops or types\n",
        cases.len()
    ));
    report.push_str(&format!(
        "\nNative code: every passing case also ran compiled for this machine (host features and baseline x86_64), \
         except {native_excluded} listed in tests/conformance/native-exclusions.txt.\n{cross_summary}"
    ));
    report.push_str("\nUnsupported (op or type, cases): ");
    let list: Vec<String> = unsupported_ops.iter().map(|(k, v)| format!("{k} {v}")).collect();
    report.push_str(&list.join("; "));
    report.push('\n');
    let out = common::repo_root().join("target/conformance-report.md");
    std::fs::write(&out, &report).unwrap();
    println!("{report}");
    assert!(problems.is_empty(), "{} conformance problem(s):\n{}", problems.len(), problems.join("\n"));
    assert!(passed > 0, "no conformance case ran");
}

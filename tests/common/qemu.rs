//! Runs the CODE of `.edgec` artifacts for aarch64 and riscv64 under qemu-user (and natively for
//! the host), through the C harness `tests/harness/run_code.c`, many jobs per emulator process.
//!
//! Needs `scripts/setup-cross.sh` (qemu-user and the cross gcc toolchains; `scripts/test.sh`
//! runs it). The harness is built once per architecture and process, cached as
//! `target/cross/<arch>/run_code` and rebuilt when the C source is newer. Each `run_jobs` call
//! writes its files to a fresh `target/cross/<arch>/tmp-<pid>-<n>/`, removed on success and kept
//! on failure for inspection.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use edgec_runtime::{Arch, Artifact};

/// Where generated code runs: `Host` runs the harness natively (x86_64 here), the others under
/// qemu-user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CrossArch {
    Host,
    Aarch64,
    Riscv64,
}

/// qemu `-cpu` for aarch64 with every feature the format knows (neon, dotprod, i8mm, fp16).
pub const AARCH64_CPU_ALL: &str = "max";
/// qemu `-cpu` for riscv64 with every feature the format knows (v with VLEN 128, zba, zbb).
pub const RISCV64_CPU_ALL: &str = "rv64,v=true,vlen=128,vext_spec=v1.0,zba=true,zbb=true";

/// How long one harness process may run before it is killed (override: `EDGEC_QEMU_TIMEOUT`,
/// in seconds), so generated code that never returns fails the test instead of hanging it.
const DEFAULT_TIMEOUT_SECS: u64 = 600;

impl CrossArch {
    pub const CROSS: [CrossArch; 2] = [CrossArch::Aarch64, CrossArch::Riscv64];

    pub fn name(self) -> &'static str {
        match self {
            CrossArch::Host => "host",
            CrossArch::Aarch64 => "aarch64",
            CrossArch::Riscv64 => "riscv64",
        }
    }

    /// The format's architecture of the code this runs.
    pub fn arch(self) -> Arch {
        match self {
            CrossArch::Host => Arch::host().expect("the host architecture is not one the format knows"),
            CrossArch::Aarch64 => Arch::Aarch64,
            CrossArch::Riscv64 => Arch::Riscv64,
        }
    }

    /// A target triple for artifacts this runs.
    pub fn triple(self) -> &'static str {
        match self.arch() {
            Arch::X86_64 => "x86_64-unknown-linux-gnu",
            Arch::Aarch64 => "aarch64-unknown-linux-gnu",
            Arch::Riscv64 => "riscv64gc-unknown-linux-gnu",
        }
    }

    /// The feature that switches the integer and vector kernels on: SDOT on aarch64, V on riscv64.
    pub fn kernel_feature(self) -> &'static str {
        match self {
            CrossArch::Host => "",
            CrossArch::Aarch64 => "+dotprod",
            CrossArch::Riscv64 => "+v",
        }
    }

    /// The qemu `-cpu` value that enables every feature bit of the format.
    pub fn cpu_all_features(self) -> Option<&'static str> {
        match self {
            CrossArch::Host => None,
            CrossArch::Aarch64 => Some(AARCH64_CPU_ALL),
            CrossArch::Riscv64 => Some(RISCV64_CPU_ALL),
        }
    }

    pub fn compiler(self) -> &'static str {
        match self {
            CrossArch::Host => "gcc",
            CrossArch::Aarch64 => "aarch64-linux-gnu-gcc",
            CrossArch::Riscv64 => "riscv64-linux-gnu-gcc",
        }
    }

    /// (qemu binary, sysroot for `-L`).
    pub fn qemu(self) -> Option<(&'static str, &'static str)> {
        match self {
            CrossArch::Host => None,
            CrossArch::Aarch64 => Some(("qemu-aarch64", "/usr/aarch64-linux-gnu")),
            CrossArch::Riscv64 => Some(("qemu-riscv64", "/usr/riscv64-linux-gnu")),
        }
    }
}

/// One call of an artifact's entry function.
#[derive(Clone, Debug, Default)]
pub struct Job {
    /// Shown in the harness output and in errors; no newlines.
    pub name: String,
    /// A complete `.edgec` file for the run's architecture.
    pub artifact: Vec<u8>,
    /// Symbol values, in META `symbols` order.
    pub symbols: Vec<i64>,
    /// Raw little-endian bytes per input, in META order; sizes must match META for `symbols`.
    pub inputs: Vec<Vec<u8>>,
    /// Byte size per output, in META order; must match META for `symbols`.
    pub output_sizes: Vec<usize>,
    /// Give the code a `parallel_for` that runs tasks serially this many units at a time (last
    /// chunk first); `None` passes NULL.
    pub parallel_chunk: Option<i64>,
}

/// Runs every job in one harness process (one qemu for the cross architectures) and returns the
/// outputs: per job, per output, the bytes the code wrote. `qemu_cpu` is passed as `-cpu` (see
/// [`CrossArch::cpu_all_features`]); it must be `None` for `Host`.
pub fn run_jobs(arch: CrossArch, jobs: &[Job], qemu_cpu: Option<&str>) -> Result<Vec<Vec<Vec<u8>>>, String> {
    if arch == CrossArch::Host && qemu_cpu.is_some() {
        return Err("run_jobs: qemu_cpu is meaningless for CrossArch::Host".into());
    }
    let qemu = match arch.qemu() {
        Some((bin, sysroot)) => Some((find_tool(bin)?, sysroot)),
        None => None,
    };
    let harness = harness(arch)?;
    let dir = fresh_dir(arch)?;
    let jobfile = write_jobs(arch, jobs, &dir)?;

    let mut cmd = match &qemu {
        Some((bin, sysroot)) => {
            let mut c = Command::new(bin);
            c.arg("-L").arg(sysroot);
            if let Some(cpu) = qemu_cpu {
                c.arg("-cpu").arg(cpu);
            }
            c.arg(&harness);
            c
        }
        None => Command::new(&harness),
    };
    cmd.arg(&jobfile);
    let shown = format!("{cmd:?}");
    let (stdout_path, stderr_path) = (dir.join("stdout"), dir.join("stderr"));
    let file = |p: &Path| std::fs::File::create(p).map_err(|e| format!("cannot create {}: {e}", p.display()));
    cmd.stdin(Stdio::null()).stdout(file(&stdout_path)?).stderr(file(&stderr_path)?);
    let mut child = cmd.spawn().map_err(|e| format!("cannot start {shown}: {e}"))?;
    let timeout = std::env::var("EDGEC_QEMU_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(DEFAULT_TIMEOUT_SECS), Duration::from_secs);
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => return Err(format!("waiting for {shown}: {e}")),
        }
    };
    let stdout = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();

    // `ok NAME` per finished job, in order; anything else explains a failure.
    let oks = stdout.lines().take_while(|l| l.strip_prefix("ok ").is_some()).count();
    let clean = status.is_some_and(|s| s.success()) && oks == jobs.len() && stdout.lines().count() == jobs.len();
    if !clean {
        let mut msg = format!("{} harness run failed: ", arch.name());
        match status {
            None => write!(msg, "killed after {}s (EDGEC_QEMU_TIMEOUT)", timeout.as_secs()).unwrap(),
            Some(s) => write!(msg, "{s}").unwrap(),
        }
        match oks.checked_sub(1).and_then(|i| jobs.get(i)) {
            Some(last) => write!(msg, "; last ok job: `{}` ({oks} of {})", last.name, jobs.len()).unwrap(),
            None => write!(msg, "; no job finished ({} jobs)", jobs.len()).unwrap(),
        }
        if let Some(next) = jobs.get(oks) {
            write!(msg, "; first job without ok: `{}`", next.name).unwrap();
        }
        let problems: Vec<&str> = stdout.lines().filter(|l| !l.starts_with("ok ")).collect();
        if !problems.is_empty() {
            write!(msg, "\nharness: {}", problems.join("\nharness: ")).unwrap();
        }
        if !stderr.trim().is_empty() {
            write!(msg, "\nstderr: {}", stderr.trim_end()).unwrap();
        }
        write!(msg, "\ncommand: {shown}\nfiles kept in {}", dir.display()).unwrap();
        return Err(msg);
    }

    let mut results = Vec::with_capacity(jobs.len());
    for (j, job) in jobs.iter().enumerate() {
        let mut outs = Vec::with_capacity(job.output_sizes.len());
        for (k, &size) in job.output_sizes.iter().enumerate() {
            let path = dir.join(format!("{j}.out{k}"));
            let bytes =
                std::fs::read(&path).map_err(|e| format!("job `{}`: cannot read {}: {e}", job.name, path.display()))?;
            if bytes.len() != size {
                return Err(format!("job `{}`: output {k} has {} bytes, expected {size}", job.name, bytes.len()));
            }
            outs.push(bytes);
        }
        results.push(outs);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(results)
}

/// The harness binary for `arch`, built on first use in this process.
pub fn harness(arch: CrossArch) -> Result<PathBuf, String> {
    static BUILT: OnceLock<Mutex<HashMap<CrossArch, PathBuf>>> = OnceLock::new();
    let mut built = BUILT.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.get(&arch) {
        return Ok(path.clone());
    }
    remove_stale_dirs(arch);
    let path = build_harness(arch)?;
    built.insert(arch, path.clone());
    Ok(path)
}

fn build_harness(arch: CrossArch) -> Result<PathBuf, String> {
    let source = super::repo_root().join("tests/harness/run_code.c");
    let dir = cross_dir().join(arch.name());
    let out = dir.join("run_code");
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let src_time = mtime(&source).ok_or_else(|| format!("cannot stat {}", source.display()))?;
    if mtime(&out).is_some_and(|t| t >= src_time) {
        return Ok(out);
    }
    let cc = find_tool(arch.compiler())?;
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    // Build under a private name and rename, so concurrent test processes never see half a file.
    let tmp = dir.join(format!("run_code.tmp-{}", std::process::id()));
    let mut cmd = Command::new(&cc);
    cmd.args(["-std=c99", "-O2", "-g", "-Wall", "-Wextra", "-pedantic", "-o"]).arg(&tmp).arg(&source);
    if arch != CrossArch::Host {
        // Static: no dynamic loader to emulate, so qemu starts faster and needs no sysroot.
        cmd.arg("-static");
    }
    let output = cmd.output().map_err(|e| format!("cannot run {}: {e}", cc.display()))?;
    if !output.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!(
            "building the {} harness failed ({}): {:?}\n{}",
            arch.name(),
            output.status,
            cmd,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    std::fs::rename(&tmp, &out).map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), out.display()))?;
    Ok(out)
}

/// `target/cross`, next to the test binary's profile directory.
fn cross_dir() -> PathBuf {
    // The test executable is target/<profile>/deps/<name>-<hash>.
    let target = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(Path::to_path_buf))
        .filter(|t| t.join("CACHEDIR.TAG").exists())
        .unwrap_or_else(|| super::repo_root().join("target"));
    target.join("cross")
}

/// Removes the `tmp-<pid>-<n>` folders (kept after failures) of test processes that have ended.
fn remove_stale_dirs(arch: CrossArch) {
    let Ok(entries) = std::fs::read_dir(cross_dir().join(arch.name())) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name.to_str().and_then(|n| n.strip_prefix("tmp-")).and_then(|n| n.split('-').next());
        if let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok()) {
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

fn fresh_dir(arch: CrossArch) -> Result<PathBuf, String> {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = cross_dir().join(arch.name()).join(format!("tmp-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir); // left over from an earlier process with the same pid
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

/// A tool on PATH, or an error that says how to install it.
fn find_tool(name: &str) -> Result<PathBuf, String> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("`{name}` not found on PATH: run scripts/setup-cross.sh (installs qemu-user and the cross gcc toolchains)"))
}

/// Splits each artifact, checks the job against its META and writes the files and the job list.
fn write_jobs(arch: CrossArch, jobs: &[Job], dir: &Path) -> Result<PathBuf, String> {
    let mut list = String::new();
    let write = |path: &Path, bytes: &[u8]| {
        std::fs::write(path, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    let text = |p: &Path| -> Result<String, String> {
        let s = p.to_str().ok_or_else(|| format!("{}: path is not UTF-8", p.display()))?;
        if s.contains(['\n', '\r']) {
            return Err(format!("{s:?}: path contains a newline"));
        }
        Ok(s.to_string())
    };
    for (j, job) in jobs.iter().enumerate() {
        let err = |what: String| format!("job {j} `{}`: {what}", job.name);
        if job.name.is_empty() || job.name.contains(['\n', '\r', '\0']) {
            return Err(err("the name must be non-empty, without newlines or NUL".into()));
        }
        let art = Artifact::parse(&job.artifact).map_err(|e| err(format!("invalid artifact: {e}")))?;
        if art.arch != arch.arch() {
            return Err(err(format!("the artifact is for {}, this run is {}", art.arch.name(), arch.arch().name())));
        }
        let meta = &art.meta;
        if job.symbols.len() != meta.symbols.len() {
            return Err(err(format!("{} symbol values, META declares {}", job.symbols.len(), meta.symbols.len())));
        }
        if job.inputs.len() != meta.inputs.len() || job.output_sizes.len() != meta.outputs.len() {
            return Err(err(format!(
                "{} inputs and {} outputs, META declares {} and {}",
                job.inputs.len(),
                job.output_sizes.len(),
                meta.inputs.len(),
                meta.outputs.len()
            )));
        }
        let values: HashMap<&str, i64> =
            meta.symbols.iter().map(|s| s.name.as_str()).zip(job.symbols.iter().copied()).collect();
        let sizes = |tensors: &[edgec_runtime::TensorMeta]| -> Result<Vec<usize>, String> {
            tensors
                .iter()
                .map(|t| {
                    let mut n = t.dtype.size() as u64;
                    for d in &t.shape {
                        let v = d.eval(&values).map_err(|e| err(format!("`{}` dimension `{d}`: {e}", t.name)))?;
                        n = n.checked_mul(v).ok_or_else(|| err(format!("`{}`: size overflows", t.name)))?;
                    }
                    usize::try_from(n).map_err(|_| err(format!("`{}`: {n} bytes", t.name)))
                })
                .collect()
        };
        for ((bytes, want), t) in job.inputs.iter().zip(sizes(&meta.inputs)?).zip(&meta.inputs) {
            if bytes.len() != want {
                return Err(err(format!("input `{}` has {} bytes, META says {want}", t.name, bytes.len())));
            }
        }
        for ((&got, want), t) in job.output_sizes.iter().zip(sizes(&meta.outputs)?).zip(&meta.outputs) {
            if got != want {
                return Err(err(format!("output `{}` size {got}, META says {want}", t.name)));
            }
        }

        let code = dir.join(format!("{j}.code"));
        let weights = dir.join(format!("{j}.weights"));
        write(&code, art.code)?;
        write(&weights, art.weights)?;
        writeln!(list, "job {}", job.name).unwrap();
        writeln!(list, "code {}", text(&code)?).unwrap();
        writeln!(list, "entry {}", meta.entry_offset).unwrap();
        writeln!(list, "weights {}", text(&weights)?).unwrap();
        writeln!(list, "arena {}", meta.arena_bytes).unwrap();
        let symbols: String = job.symbols.iter().map(|v| format!(" {v}")).collect();
        writeln!(list, "symbols {}{symbols}", job.symbols.len()).unwrap();
        if let Some(chunk) = job.parallel_chunk {
            writeln!(list, "parallel {chunk}").unwrap();
        }
        for (k, bytes) in job.inputs.iter().enumerate() {
            let path = dir.join(format!("{j}.in{k}"));
            write(&path, bytes)?;
            writeln!(list, "input {}", text(&path)?).unwrap();
        }
        for (k, size) in job.output_sizes.iter().enumerate() {
            writeln!(list, "output {size} {}", text(&dir.join(format!("{j}.out{k}")))?).unwrap();
        }
        writeln!(list, "end").unwrap();
    }
    let path = dir.join("jobs.txt");
    write(&path, list.as_bytes())?;
    Ok(path)
}

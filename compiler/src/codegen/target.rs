//! Compilation targets: a triple or short name, CPU feature bits, and the Cranelift ISA they select.
//!
//! The feature bits are the artifact format's (`edgec_runtime::Arch`), so one table decides both
//! which instructions Cranelift may use and what the runtime checks on the device.

use std::str::FromStr;

use cranelift_codegen::isa::{self, OwnedTargetIsa};
use cranelift_codegen::settings::{self, Configurable};
use edgec_runtime::Arch;
use target_lexicon::Triple;

use crate::error::{Error, Result};

#[derive(Clone)]
pub struct Target {
    pub triple: Triple,
    pub arch: Arch,
    /// Required CPU features, as the artifact's feature bits.
    pub features: u64,
    pub isa: OwnedTargetIsa,
}

/// `--cpu` presets: named feature sets per architecture.
const CPU_PRESETS: &[(&str, Arch, &str)] = &[
    ("x86-64", Arch::X86_64, ""),
    ("x86-64-v2", Arch::X86_64, "sse3,ssse3,sse4.1,sse4.2,popcnt"),
    ("x86-64-v3", Arch::X86_64, "sse3,ssse3,sse4.1,sse4.2,popcnt,avx,avx2,fma,bmi1,bmi2,lzcnt"),
    ("cortex-a53", Arch::Aarch64, "neon"),
    ("cortex-a55", Arch::Aarch64, "neon,dotprod"),
    ("cortex-a76", Arch::Aarch64, "neon,dotprod"),
    ("neoverse-n2", Arch::Aarch64, "neon,dotprod,i8mm"),
    ("rv64gc", Arch::Riscv64, ""),
    ("rv64gcv", Arch::Riscv64, "v"),
];

impl Target {
    /// `name`: `host`, `x86_64`, `aarch64`, `riscv64` or a full triple. `cpu` picks a preset,
    /// `features` (`+avx2,+fma`) adds to it; without either the baseline of the architecture is used
    /// (the host's own features for `host`).
    pub fn parse(name: &str, cpu: Option<&str>, features: Option<&str>) -> Result<Target> {
        let host = name == "host";
        let triple = match name {
            "host" => Triple::host(),
            "x86_64" => Triple::from_str("x86_64-unknown-linux-gnu").unwrap(),
            "aarch64" | "arm64" => Triple::from_str("aarch64-unknown-linux-gnu").unwrap(),
            "riscv64" => Triple::from_str("riscv64gc-unknown-linux-gnu").unwrap(),
            t => Triple::from_str(t).map_err(|e| Error::Invalid(format!("target `{t}`: {e}")))?,
        };
        let triple_text = triple.to_string();
        let arch = Arch::from_triple(&triple_text).ok_or_else(|| {
            Error::Invalid(format!("target `{triple_text}`: unsupported architecture (x86_64, aarch64, riscv64)"))
        })?;
        let mut bits = arch.mandatory_bits();
        if host && cpu.is_none() && features.is_none() {
            bits |= edgec_runtime::host::host_feature_bits();
        }
        if let Some(cpu) = cpu {
            if cpu == "native" {
                bits |= edgec_runtime::host::host_feature_bits();
            } else {
                let (_, a, list) = CPU_PRESETS.iter().find(|(n, _, _)| *n == cpu).ok_or_else(|| {
                    let names: Vec<_> = CPU_PRESETS.iter().filter(|p| p.1 == arch).map(|p| p.0).collect();
                    Error::Invalid(format!(
                        "unknown --cpu `{cpu}` for {} (known: native, {})",
                        arch.name(),
                        names.join(", ")
                    ))
                })?;
                if *a != arch {
                    return Err(Error::Invalid(format!("--cpu `{cpu}` is not an {} CPU", arch.name())));
                }
                bits |= arch.parse_features(list).map_err(Error::Invalid)?;
            }
        }
        if let Some(f) = features {
            bits |= arch.parse_features(f).map_err(Error::Invalid)?;
        }
        Target::with_features(triple, arch, bits)
    }

    pub fn with_features(triple: Triple, arch: Arch, bits: u64) -> Result<Target> {
        let mut shared = settings::builder();
        for (k, v) in [("opt_level", "speed"), ("enable_verifier", "false"), ("is_pic", "false")] {
            shared.set(k, v).expect("known Cranelift setting");
        }
        let mut b = isa::lookup(triple.clone())
            .map_err(|e| Error::Invalid(format!("target `{triple}`: Cranelift has no backend: {e}")))?;
        for name in arch.feature_list(bits) {
            let flag = match (arch, name.as_str()) {
                (Arch::X86_64, "sse4.1") => "has_sse41".to_string(),
                (Arch::X86_64, "sse4.2") => "has_sse42".to_string(),
                (Arch::Aarch64, "neon") => continue,
                (_, n) => format!("has_{n}"),
            };
            b.enable(&flag).map_err(|e| Error::Invalid(format!("feature `{name}`: {e}")))?;
        }
        let isa =
            b.finish(settings::Flags::new(shared)).map_err(|e| Error::Invalid(format!("target `{triple}`: {e}")))?;
        Ok(Target { triple, arch, features: bits, isa })
    }

    pub fn has(&self, feature: &str) -> bool {
        self.arch.feature_bit(feature).is_some_and(|b| self.features & (1 << b) != 0)
    }

    /// 128-bit float vectors: always on x86_64 (SSE2) and aarch64 (NEON); riscv64 only with V
    /// (Cranelift's riscv64 backend cannot lower vector types without it).
    pub fn simd(&self) -> bool {
        match self.arch {
            Arch::X86_64 | Arch::Aarch64 => true,
            Arch::Riscv64 => self.has("v"),
        }
    }

    /// A fused multiply-add that is one instruction (x86_64 needs FMA3; without it Cranelift would
    /// emit a libm call).
    pub fn fma(&self) -> bool {
        match self.arch {
            Arch::X86_64 => self.has("fma") && self.has("avx"),
            Arch::Aarch64 | Arch::Riscv64 => true,
        }
    }

    pub fn feature_text(&self) -> String {
        self.arch.feature_list(self.features).iter().map(|f| format!("+{f}")).collect::<Vec<_>>().join(",")
    }
}

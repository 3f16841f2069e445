#!/usr/bin/env bash
# Installs what the cross-target tests need to run generated aarch64 and riscv64 code on this
# (x86_64) machine: qemu-user and the cross C toolchains with their sysroots (which provide the
# `-L` library roots for qemu and compile tests/harness/run_code.c). Idempotent: does nothing when
# every tool is already on PATH; runs `apt-get update` only when it has to install.
set -euo pipefail

tools=(qemu-aarch64 qemu-riscv64 aarch64-linux-gnu-gcc riscv64-linux-gnu-gcc)
packages=(qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross gcc-riscv64-linux-gnu libc6-dev-riscv64-cross)

missing=()
for tool in "${tools[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

echo "setup-cross: missing ${missing[*]}; installing ${packages[*]}" >&2
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup-cross: apt-get not found; install the equivalents of: ${packages[*]}" >&2
    exit 1
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "setup-cross: not root and sudo not found; install as root: ${packages[*]}" >&2
        exit 1
    fi
    sudo=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null

for tool in "${tools[@]}"; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "setup-cross: $tool is still missing after installing ${packages[*]}" >&2
        exit 1
    fi
done

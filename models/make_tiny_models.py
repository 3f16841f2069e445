#!/usr/bin/env python3
"""Write tiny transformer ONNX fixtures in the style real exporters produce.

Each model goes to models/tiny/<name>/ as model.onnx plus inputs/<input>.npy and
expected/<output>.npy (computed by onnxruntime, CPU EP, graph optimizations disabled).
The graphs mimic torch.onnx (TorchScript) / HuggingFace Optimum exports: scoped node names
("/model/layers.0/self_attn/Shape_1"), Constant nodes for scalars and shapes, Linear weights
stored transposed as "onnx::MatMul_N" initializers, Shape->Gather->Unsqueeze->Concat->Reshape
chains, masks built from attention_mask. Weights come from a fixed seed: reruns write the
same bytes. Run via models/make-tiny-models.sh (which sets up the venv).

`--llama-135m [OUT_DIR]` instead writes only a benchmark model: the same Llama graph at
SmolLM2-135M's size with random weights (model.onnx + model.onnx.data, ~540 MB) and batch-1
inputs, by default to data/bench/llama135m/ (see benches/interp_llama135m.sh).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

OUT = Path(__file__).resolve().parent / "tiny"
REPO = OUT.parent.parent
BATCH, SEQ = 2, 7
MAX_POS = 32  # size of position tables / causal buffers
F32_MIN = float(np.finfo(np.float32).min)  # what transformers uses to mask
INT64_MAX = int(np.iinfo(np.int64).max)  # TorchScript's "slice to end"
DIMS = ["batch_size", "sequence_length"]


class Builder:
    """Collects nodes and initializers, naming them the way the TorchScript exporter does."""

    def __init__(self, opset: int, seed: int):
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.prefix = ""
        self.used = Counter()
        self.n_matmul = 0

    @contextlib.contextmanager
    def scope(self, name: str):
        saved, self.prefix = self.prefix, f"{self.prefix}/{name}"
        try:
            yield
        finally:
            self.prefix = saved

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs):
        base = f"{self.prefix}/{op_type}"
        name = base if self.used[base] == 0 else f"{base}_{self.used[base]}"
        self.used[base] += 1
        outs = [f"{name}_output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, **attrs))
        return outs[0] if outputs == 1 else outs

    # -- constants and weights ---------------------------------------------------------
    def const(self, value, dtype) -> str:
        return self.op("Constant", value=numpy_helper.from_array(np.array(value, dtype)))

    def i64(self, value) -> str:
        return self.const(value, np.int64)

    def f32(self, value) -> str:
        return self.const(value, np.float32)

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def randn(self, *shape, std=1.0, mean=0.0) -> np.ndarray:
        return (mean + std * self.rng.standard_normal(shape)).astype(np.float32)

    def linear_weight(self, out_f: int, in_f: int) -> np.ndarray:
        """A torch.nn.Linear weight, [out, in]."""
        return self.randn(out_f, in_f, std=in_f**-0.5)

    def matmul_t(self, x: str, w: np.ndarray) -> str:
        """x @ w.T with w.T stored as an initializer, as TorchScript exports nn.Linear."""
        self.n_matmul += 1
        return self.op("MatMul", x, self.init(f"onnx::MatMul_{self.n_matmul}", w.T))

    # -- shape helpers -----------------------------------------------------------------
    def dim(self, x: str, i: int) -> str:
        """x.size(i) as a 0-d int64 tensor: Shape -> Gather."""
        return self.op("Gather", self.op("Shape", x), self.i64(i), axis=0)

    def unsqueeze(self, x: str, axes) -> str:
        return self.op("Unsqueeze", x, self.i64(axes))

    def reduce_mean(self, x: str, axes) -> str:
        if self.opset >= 18:
            return self.op("ReduceMean", x, self.i64(axes), keepdims=1)
        return self.op("ReduceMean", x, axes=axes, keepdims=1)

    def model(self, inputs, outputs, doc: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "main_graph", inputs, outputs, self.inits)
        return helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", self.opset)],
            ir_version=8,
            producer_name="edgec/models/make_tiny_models.py",
            doc_string=doc,
        )


def tensor_in(name, elem=TensorProto.INT64, dims=DIMS):
    return helper.make_tensor_value_info(name, elem, dims)


def tensor_out(name, *last):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, DIMS + list(last))


# ======================================================================================
# Llama (transformers LlamaForCausalLM exported with opset 18)
# ======================================================================================
LLAMA = dict(vocab=128, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=128,
             eps=1e-6, theta=10000.0)
# SmolLM2-135M's shape (134.5M parameters, tied embeddings) with random weights of std `std`,
# for benches/interp_llama135m.sh; written by `--llama-135m`, never to models/tiny.
LLAMA_135M = dict(vocab=49152, hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64, ffn=1536,
                  eps=1e-5, theta=100000.0, max_pos=2048, std=0.02)


def llama_weights(b: Builder, c=LLAMA) -> dict[str, np.ndarray]:
    h, hd = c["hidden"], c["head_dim"]
    std = c.get("std")  # one std for embeddings and Linear weights; the fixtures: 0.5 and fan_in**-0.5
    linear_weight = b.linear_weight if std is None else (lambda out_f, in_f: b.randn(out_f, in_f, std=std))
    w = {"model.embed_tokens.weight": b.randn(c["vocab"], h, std=std or 0.5)}
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = b.randn(h, std=0.1, mean=1.0)
        w[p + "self_attn.q_proj.weight"] = linear_weight(c["heads"] * hd, h)
        w[p + "self_attn.k_proj.weight"] = linear_weight(c["kv_heads"] * hd, h)
        w[p + "self_attn.v_proj.weight"] = linear_weight(c["kv_heads"] * hd, h)
        w[p + "self_attn.o_proj.weight"] = linear_weight(h, c["heads"] * hd)
        w[p + "post_attention_layernorm.weight"] = b.randn(h, std=0.1, mean=1.0)
        w[p + "mlp.gate_proj.weight"] = linear_weight(c["ffn"], h)
        w[p + "mlp.up_proj.weight"] = linear_weight(c["ffn"], h)
        w[p + "mlp.down_proj.weight"] = linear_weight(h, c["ffn"])
    w["model.norm.weight"] = b.randn(h, std=0.1, mean=1.0)
    return w


def build_llama(c=LLAMA, seed=1) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    nq, nkv, hd = c["heads"], c["kv_heads"], c["head_dim"]
    b = Builder(opset=18, seed=seed)
    W = llama_weights(b, c)

    def rms_norm(x, weight, rsqrt="Div"):
        # hidden.to(float32); x * rsqrt(x.pow(2).mean(-1, keepdim=True) + eps); weight * x
        x = b.op("Cast", x, to=TensorProto.FLOAT)
        var = b.reduce_mean(b.op("Pow", x, b.f32(2.0)), [-1])
        std = b.op("Sqrt", b.op("Add", var, b.f32(c["eps"])))
        inv = b.op("Div", b.f32(1.0), std) if rsqrt == "Div" else b.op("Reciprocal", std)
        x = b.op("Cast", b.op("Mul", x, inv), to=TensorProto.FLOAT)
        return b.op("Mul", b.init(weight, W[weight]), x)

    def rotate_half(x):
        half = b.op("Div", b.dim(x, 3), b.i64(2))  # x.shape[-1] // 2
        x1 = b.op("Slice", x, b.i64([0]), b.unsqueeze(half, [0]), b.i64([3]), b.i64([1]))
        x2 = b.op("Slice", x, b.unsqueeze(half, [0]), b.i64([INT64_MAX]), b.i64([3]), b.i64([1]))
        return b.op("Concat", b.op("Neg", x2), x1, axis=-1)

    def split_heads(x, bsz, q_len, n):  # view(bsz, q_len, n, hd).transpose(1, 2)
        shape = b.op("Concat", b.unsqueeze(bsz, [0]), b.unsqueeze(q_len, [0]),
                     b.i64([n]), b.i64([hd]), axis=0)
        return b.op("Transpose", b.op("Reshape", x, shape), perm=[0, 2, 1, 3])

    def repeat_kv(x, bsz, q_len):  # x[:, :, None].expand(b, nkv, rep, s, hd).reshape(b, nq, s, hd)
        big = b.op("Concat", b.unsqueeze(bsz, [0]), b.i64([nkv]), b.i64([nq // nkv]),
                   b.unsqueeze(q_len, [0]), b.i64([hd]), axis=0)
        x = b.op("Expand", b.unsqueeze(x, [2]), big)
        shape = b.op("Concat", b.unsqueeze(bsz, [0]), b.i64([nq]), b.unsqueeze(q_len, [0]),
                     b.i64([hd]), axis=0)
        return b.op("Reshape", x, shape)

    def attention(x, p, mask, cos, sin):
        bsz, q_len = b.dim(x, 0), b.dim(x, 1)
        with b.scope("q_proj"):
            q = b.matmul_t(x, W[p + "q_proj.weight"])
        with b.scope("k_proj"):
            k = b.matmul_t(x, W[p + "k_proj.weight"])
        with b.scope("v_proj"):
            v = b.matmul_t(x, W[p + "v_proj.weight"])
        q = split_heads(q, bsz, q_len, nq)
        k, v = split_heads(k, bsz, q_len, nkv), split_heads(v, bsz, q_len, nkv)
        q = b.op("Add", b.op("Mul", q, cos), b.op("Mul", rotate_half(q), sin))
        k = b.op("Add", b.op("Mul", k, cos), b.op("Mul", rotate_half(k), sin))
        k, v = repeat_kv(k, bsz, q_len), repeat_kv(v, bsz, q_len)
        scores = b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2]))
        scores = b.op("Add", b.op("Div", scores, b.f32(np.sqrt(hd))), mask)
        probs = b.op("Cast", b.op("Softmax", scores, axis=-1), to=TensorProto.FLOAT)
        out = b.op("Transpose", b.op("MatMul", probs, v), perm=[0, 2, 1, 3])
        out = b.op("Reshape", out, b.op("Concat", b.unsqueeze(bsz, [0]), b.unsqueeze(q_len, [0]),
                                         b.i64([nq * hd]), axis=0))
        with b.scope("o_proj"):
            return b.matmul_t(out, W[p + "o_proj.weight"])

    def causal_mask(input_ids, attention_mask):
        # transformers' _update_causal_mask, as traced for an export without past kv
        bsz, seq = b.dim(input_ids, 0), b.dim(input_ids, 1)
        seq1 = b.unsqueeze(seq, [0])
        full = b.op("ConstantOfShape", b.op("Concat", seq1, seq1, axis=0),
                    value=numpy_helper.from_array(np.array([F32_MIN], np.float32)))
        mask = b.op("Trilu", full, b.i64(1), upper=1)
        arange = b.op("Range", b.i64(0), seq, b.i64(1))
        cache_pos = b.op("Reshape", b.op("Range", b.i64(0), seq, b.i64(1)), b.i64([-1, 1]))
        mask = b.op("Mul", mask, b.op("Cast", b.op("Greater", arange, cache_pos), to=TensorProto.FLOAT))
        mask = b.op("Expand", b.unsqueeze(mask, [0, 1]),
                    b.op("Concat", b.unsqueeze(bsz, [0]), b.i64([1]), seq1, seq1, axis=0))
        pad = b.op("Cast", b.unsqueeze(attention_mask, [1, 2]), to=TensorProto.FLOAT)
        is_pad = b.op("Equal", b.op("Add", mask, pad), b.f32(0.0))
        return b.op("Where", is_pad, b.f32(F32_MIN), mask)

    emb = "model.embed_tokens.weight"
    with b.scope("model"):
        with b.scope("embed_tokens"):
            h = b.op("Gather", b.init(emb, W[emb]), "input_ids")
        mask = causal_mask("input_ids", "attention_mask")
        with b.scope("rotary_emb"):  # cos_cached[position_ids].unsqueeze(1)
            theta = c["theta"] ** -(np.arange(0, hd, 2) / hd)
            ang = np.outer(np.arange(c.get("max_pos", MAX_POS)), theta)
            ang = np.concatenate([ang, ang], axis=-1)
            cos = b.op("Gather", b.init("cos_cached", np.cos(ang).astype(np.float32)), "position_ids")
            sin = b.op("Gather", b.init("sin_cached", np.sin(ang).astype(np.float32)), "position_ids")
            cos, sin = b.unsqueeze(cos, [1]), b.unsqueeze(sin, [1])
        for i in range(c["layers"]):
            p = f"model.layers.{i}."
            with b.scope(f"layers.{i}"):
                with b.scope("input_layernorm"):
                    x = rms_norm(h, p + "input_layernorm.weight")
                with b.scope("self_attn"):
                    h = b.op("Add", h, attention(x, p + "self_attn.", mask, cos, sin))
                with b.scope("post_attention_layernorm"):
                    x = rms_norm(h, p + "post_attention_layernorm.weight")
                with b.scope("mlp"):
                    with b.scope("gate_proj"):
                        gate = b.matmul_t(x, W[p + "mlp.gate_proj.weight"])
                    with b.scope("act_fn"):
                        gate = b.op("Mul", gate, b.op("Sigmoid", gate))
                    with b.scope("up_proj"):
                        up = b.matmul_t(x, W[p + "mlp.up_proj.weight"])
                    with b.scope("down_proj"):
                        down = b.matmul_t(b.op("Mul", gate, up), W[p + "mlp.down_proj.weight"])
                h = b.op("Add", h, down)
        with b.scope("norm"):
            h = rms_norm(h, "model.norm.weight", rsqrt="Reciprocal")
    with b.scope("lm_head"):  # tied to the embedding
        b.nodes.append(helper.make_node("MatMul", [h, b.op("Transpose", emb, perm=[1, 0])],
                                        ["logits"], name="/lm_head/MatMul"))
    model = b.model(
        [tensor_in("input_ids"), tensor_in("attention_mask"), tensor_in("position_ids")],
        [tensor_out("logits", c["vocab"])],
        "Tiny Llama (GQA 4q/2kv heads, RoPE, SwiGLU, RMSNorm), opset 18, TorchScript/Optimum style."
        if c is LLAMA else f"Llama {c}, random weights (seed {seed}), opset 18, TorchScript/Optimum style.",
    )
    return model, W


def llama_numpy(W, input_ids, attention_mask, position_ids, c=LLAMA) -> np.ndarray:
    """Independent float64 numpy forward pass of LlamaForCausalLM (eager semantics)."""
    nq, nkv, hd = c["heads"], c["kv_heads"], c["head_dim"]
    W = {k: v.astype(np.float64) for k, v in W.items()}
    bsz, s = input_ids.shape

    def rms(x, w):
        return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + c["eps"]))

    def heads(x, n):
        return x.reshape(bsz, s, n, hd).transpose(0, 2, 1, 3)

    def rope(x, cos, sin):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + np.concatenate([-x2, x1], axis=-1) * sin

    inv_freq = 1.0 / c["theta"] ** (np.arange(0, hd, 2) / hd)
    ang = position_ids[..., None] * inv_freq
    ang = np.concatenate([ang, ang], axis=-1)[:, None]  # [b, 1, s, hd]
    cos, sin = np.cos(ang), np.sin(ang)
    allowed = np.tril(np.ones((s, s), bool))[None] & (attention_mask[:, None, :] != 0)
    bias = np.where(allowed, 0.0, F32_MIN)[:, None]  # [b, 1, s, s]

    h = W["model.embed_tokens.weight"][input_ids]
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        x = rms(h, W[p + "input_layernorm.weight"])
        q = rope(heads(x @ W[p + "self_attn.q_proj.weight"].T, nq), cos, sin)
        k = rope(heads(x @ W[p + "self_attn.k_proj.weight"].T, nkv), cos, sin)
        v = heads(x @ W[p + "self_attn.v_proj.weight"].T, nkv)
        k, v = np.repeat(k, nq // nkv, axis=1), np.repeat(v, nq // nkv, axis=1)
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd) + bias
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        attn = (probs @ v).transpose(0, 2, 1, 3).reshape(bsz, s, nq * hd)
        h = h + attn @ W[p + "self_attn.o_proj.weight"].T
        x = rms(h, W[p + "post_attention_layernorm.weight"])
        gate = x @ W[p + "mlp.gate_proj.weight"].T
        up = x @ W[p + "mlp.up_proj.weight"].T
        h = h + (gate / (1.0 + np.exp(-gate)) * up) @ W[p + "mlp.down_proj.weight"].T
    return rms(h, W["model.norm.weight"]) @ W["model.embed_tokens.weight"].T


# ======================================================================================
# GPT-2 (transformers GPT2LMHeadModel, TorchScript export at opset 17)
# ======================================================================================
GPT2 = dict(vocab=128, hidden=64, layers=2, heads=4, ffn=256, eps=1e-5)


def build_gpt2() -> onnx.ModelProto:
    c = GPT2
    hid, nh = c["hidden"], c["heads"]
    hd = hid // nh
    b = Builder(opset=17, seed=2)
    wte = b.randn(c["vocab"], hid, std=0.5)

    def conv1d(x, prefix, n_in, n_out):
        # transformers Conv1D: addmm(bias, x.view(-1, nx), weight).view(x.size()[:-1] + (nf,))
        with b.scope(prefix.split(".")[-1]):
            w = b.init(prefix + ".weight", b.randn(n_in, n_out, std=n_in**-0.5))
            bias = b.init(prefix + ".bias", b.randn(n_out, std=0.02))
            lead = b.op("Slice", b.op("Shape", x), b.i64([0]), b.i64([-1]), b.i64([0]))
            out_shape = b.op("Concat", lead, b.i64([n_out]), axis=0)
            flat = b.op("Reshape", x, b.op("Concat", b.i64([-1]), b.unsqueeze(b.dim(x, 2), [0]), axis=0))
            return b.op("Reshape", b.op("Gemm", flat, w, bias, alpha=1.0, beta=1.0), out_shape)

    def layer_norm(x, prefix):
        with b.scope(prefix.split(".")[-1]):
            g = b.init(prefix + ".weight", b.randn(hid, std=0.1, mean=1.0))
            beta = b.init(prefix + ".bias", b.randn(hid, std=0.1))
            return b.op("LayerNormalization", x, g, beta, axis=-1, epsilon=c["eps"])

    def split_heads(x):  # x.view(x.size()[:-1] + (nh, hd)).permute(0, 2, 1, 3)
        shape = b.op("Concat", b.op("Slice", b.op("Shape", x), b.i64([0]), b.i64([-1]), b.i64([0])),
                     b.i64([nh, hd]), axis=0)
        return b.op("Transpose", b.op("Reshape", x, shape), perm=[0, 2, 1, 3])

    def attention(x, p, ext_mask, causal_buffer):
        qkv = conv1d(x, p + "c_attn", hid, 3 * hid)
        q, k, v = b.op("Split", qkv, b.i64([hid, hid, hid]), axis=2, outputs=3)
        q, k, v = split_heads(q), split_heads(k), split_heads(v)
        w = b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2]))
        w = b.op("Div", w, b.f32(float(hd) ** 0.5))
        # causal_mask = self.bias[:, :, key_len - query_len : key_len, :key_len]
        q_len, k_len = b.unsqueeze(b.dim(q, 2), [0]), b.unsqueeze(b.dim(k, 2), [0])
        causal = b.op("Slice", causal_buffer, b.op("Sub", k_len, q_len), k_len, b.i64([2]), b.i64([1]))
        causal = b.op("Slice", causal, b.i64([0]), k_len, b.i64([3]), b.i64([1]))
        w = b.op("Where", causal, w, b.f32(F32_MIN))
        w = b.op("Softmax", b.op("Add", w, ext_mask), axis=-1)
        out = b.op("MatMul", b.op("Cast", w, to=TensorProto.FLOAT), v)
        # merge heads: permute(0, 2, 1, 3).view(x.size()[:-2] + (hid,))
        out = b.op("Transpose", out, perm=[0, 2, 1, 3])
        shape = b.op("Concat", b.op("Slice", b.op("Shape", out), b.i64([0]), b.i64([-2]), b.i64([0])),
                     b.i64([hid]), axis=0)
        return conv1d(b.op("Reshape", out, shape), p + "c_proj", hid, hid)

    def gelu_new(x):  # 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
        inner = b.op("Add", x, b.op("Mul", b.f32(0.044715), b.op("Pow", x, b.f32(3.0))))
        t = b.op("Tanh", b.op("Mul", b.f32(np.sqrt(2.0 / np.pi)), inner))
        return b.op("Mul", b.op("Mul", b.f32(0.5), x), b.op("Add", b.f32(1.0), t))

    with b.scope("transformer"):
        bsz, seq = b.dim("input_ids", 0), b.dim("input_ids", 1)
        pos = b.unsqueeze(b.op("Range", b.i64(0), seq, b.i64(1)), [0])
        with b.scope("wte"):
            h = b.op("Gather", b.init("transformer.wte.weight", wte), "input_ids")
        with b.scope("wpe"):
            pe = b.op("Gather", b.init("transformer.wpe.weight", b.randn(MAX_POS, hid, std=0.1)), pos)
        h = b.op("Add", h, pe)
        # attention_mask.view(bsz, -1)[:, None, None, :]; (1.0 - mask) * finfo.min
        m = b.op("Reshape", "attention_mask", b.op("Concat", b.unsqueeze(bsz, [0]), b.i64([-1]), axis=0))
        m = b.op("Cast", b.unsqueeze(m, [1, 2]), to=TensorProto.FLOAT)
        ext_mask = b.op("Mul", b.op("Sub", b.f32(1.0), m), b.f32(F32_MIN))
        tril = np.tril(np.ones((MAX_POS, MAX_POS), bool))[None, None]
        for i in range(c["layers"]):
            p = f"transformer.h.{i}."
            buffer = b.init(p + "attn.bias", tril)
            with b.scope(f"h.{i}"):
                x = layer_norm(h, p + "ln_1")
                with b.scope("attn"):
                    h = b.op("Add", attention(x, p + "attn.", ext_mask, buffer), h)
                x = layer_norm(h, p + "ln_2")
                with b.scope("mlp"):
                    x = conv1d(x, p + "mlp.c_fc", hid, c["ffn"])
                    with b.scope("act"):
                        x = gelu_new(x)
                    h = b.op("Add", h, conv1d(x, p + "mlp.c_proj", c["ffn"], hid))
        h = layer_norm(h, "transformer.ln_f")
    # lm_head is tied to wte; TorchScript stores the transposed copy as its own initializer
    b.nodes.append(helper.make_node("MatMul", [h, b.init("onnx::MatMul_lm_head", wte.T)],
                                    ["logits"], name="/lm_head/MatMul"))
    return b.model(
        [tensor_in("input_ids"), tensor_in("attention_mask")],
        [tensor_out("logits", c["vocab"])],
        "Tiny GPT-2 (LayerNormalization, Conv1D as Gemm, fused c_attn + Split, gelu_new), opset 17.",
    )


# ======================================================================================
# BERT (transformers BertModel, TorchScript export at opset 13)
# ======================================================================================
BERT = dict(vocab=128, hidden=64, layers=2, heads=4, ffn=256, eps=1e-12, type_vocab=2)


def build_bert() -> onnx.ModelProto:
    c = BERT
    hid, nh = c["hidden"], c["heads"]
    hd = hid // nh
    b = Builder(opset=13, seed=3)

    def layer_norm(x, prefix):  # the opset < 17 decomposition of aten::layer_norm
        with b.scope("LayerNorm"):
            mean = b.reduce_mean(x, [-1])
            d = b.op("Sub", x, mean)
            var = b.reduce_mean(b.op("Pow", d, b.f32(2.0)), [-1])
            x = b.op("Div", d, b.op("Sqrt", b.op("Add", var, b.f32(c["eps"]))))
            x = b.op("Mul", x, b.init(prefix + ".LayerNorm.weight", b.randn(hid, std=0.1, mean=1.0)))
            return b.op("Add", x, b.init(prefix + ".LayerNorm.bias", b.randn(hid, std=0.1)))

    def linear(x, name, n_in, n_out):  # nn.Linear on 3-D input: MatMul + Add
        with b.scope(name.split(".")[-1]):
            y = b.matmul_t(x, b.linear_weight(n_out, n_in))
            return b.op("Add", b.init(name + ".bias", b.randn(n_out, std=0.02)), y)

    def transpose_for_scores(x):  # x.view(x.size()[:-1] + (nh, hd)).permute(0, 2, 1, 3)
        shape = b.op("Concat", b.unsqueeze(b.dim(x, 0), [0]), b.unsqueeze(b.dim(x, 1), [0]),
                     b.i64([nh]), b.i64([hd]), axis=0)
        return b.op("Transpose", b.op("Reshape", x, shape), perm=[0, 2, 1, 3])

    def self_attention(x, p, ext_mask):
        q = transpose_for_scores(linear(x, p + "query", hid, hid))
        k = transpose_for_scores(linear(x, p + "key", hid, hid))
        v = transpose_for_scores(linear(x, p + "value", hid, hid))
        scores = b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2]))
        scores = b.op("Add", b.op("Div", scores, b.f32(np.sqrt(hd))), ext_mask)
        probs = b.op("Dropout", b.op("Softmax", scores, axis=-1), b.f32(0.1))  # ratio, no training_mode
        ctx = b.op("Transpose", b.op("MatMul", probs, v), perm=[0, 2, 1, 3])
        shape = b.op("Concat", b.unsqueeze(b.dim(ctx, 0), [0]), b.unsqueeze(b.dim(ctx, 1), [0]),
                     b.i64([hid]), axis=0)
        return b.op("Reshape", ctx, shape)

    def output(x, residual, p, n_in):  # BertSelfOutput / BertOutput
        with b.scope("output"):
            x = linear(x, p + "output.dense", n_in, hid)
            x = b.op("Dropout", x, b.f32(0.1), b.const(False, np.bool_))  # training_mode = false
            return layer_norm(b.op("Add", x, residual), p + "output")

    with b.scope("embeddings"):
        seq = b.dim("input_ids", 1)
        # position_ids = self.position_ids[:, 0 : seq_length]
        position_ids = b.op("Slice", b.init("embeddings.position_ids", np.arange(MAX_POS)[None]),
                            b.i64([0]), b.unsqueeze(seq, [0]), b.i64([1]), b.i64([1]))
        with b.scope("word_embeddings"):
            words = b.op("Gather", b.init("embeddings.word_embeddings.weight",
                                          b.randn(c["vocab"], hid, std=0.5)), "input_ids")
        with b.scope("token_type_embeddings"):
            types = b.op("Gather", b.init("embeddings.token_type_embeddings.weight",
                                          b.randn(c["type_vocab"], hid, std=0.5)), "token_type_ids")
        with b.scope("position_embeddings"):
            pos = b.op("Gather", b.init("embeddings.position_embeddings.weight",
                                        b.randn(MAX_POS, hid, std=0.5)), position_ids)
        h = layer_norm(b.op("Add", b.op("Add", words, types), pos), "embeddings")
        with b.scope("dropout"):
            h = b.op("Dropout", h)  # inference-mode Dropout: identity
    # extended_attention_mask = (1.0 - attention_mask[:, None, None, :].to(float)) * -10000.0
    m = b.op("Cast", b.unsqueeze(b.unsqueeze("attention_mask", [1]), [2]), to=TensorProto.FLOAT)
    ext_mask = b.op("Mul", b.op("Sub", b.f32(1.0), m), b.f32(-10000.0))
    with b.scope("encoder"):
        for i in range(c["layers"]):
            p = f"encoder.layer.{i}."
            with b.scope(f"layer.{i}"):
                with b.scope("attention"):
                    with b.scope("self"):
                        a = self_attention(h, p + "attention.self.", ext_mask)
                    a = output(a, h, p + "attention.", hid)
                with b.scope("intermediate"):
                    x = linear(a, p + "intermediate.dense", hid, c["ffn"])
                    with b.scope("intermediate_act_fn"):  # exact GELU: x * 0.5 * (1 + erf(x / sqrt(2)))
                        erf = b.op("Erf", b.op("Div", x, b.f32(np.sqrt(2.0))))
                        x = b.op("Mul", b.op("Mul", x, b.op("Add", erf, b.f32(1.0))), b.f32(0.5))
                h = output(x, a, p, c["ffn"])
    b.nodes.append(helper.make_node("Identity", [h], ["last_hidden_state"], name="/Identity"))
    with b.scope("pooler"):
        first = b.op("Gather", h, b.i64(0), axis=1)  # hidden_states[:, 0]
        with b.scope("dense"):
            y = b.op("Gemm", first, b.init("pooler.dense.weight", b.linear_weight(hid, hid)),
                     b.init("pooler.dense.bias", b.randn(hid, std=0.02)), alpha=1.0, beta=1.0, transB=1)
        b.nodes.append(helper.make_node("Tanh", [y], ["pooler_output"], name="/pooler/activation/Tanh"))
    return b.model(
        [tensor_in("input_ids"), tensor_in("attention_mask"), tensor_in("token_type_ids")],
        [tensor_out("last_hidden_state", hid),
         helper.make_tensor_value_info("pooler_output", TensorProto.FLOAT, ["batch_size", hid])],
        "Tiny BERT (decomposed LayerNorm, Erf GELU, Dropout/Identity, pooler Gemm), opset 13.",
    )


def build_bert_int8(bert: onnx.ModelProto) -> onnx.ModelProto:
    """ORT dynamic quantization (int8 weights): DynamicQuantizeLinear + MatMulInteger + Cast + Mul."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "bert.onnx"), Path(tmp, "bert_int8.onnx")
        onnx.save_model(bert, src)
        logging.disable(logging.WARNING)  # silence "consider pre-processing" advice
        # reduce_range keeps int8 weights to 7 bits. Without it onnxruntime's x86
        # u8*s8 kernels (pmaddubsw) saturate pair sums to int16 and its outputs
        # differ from the exact MatMulInteger the ONNX spec defines.
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, reduce_range=True)
        logging.disable(logging.NOTSET)
        model = onnx.load_model(dst)
    domains = {n.domain for n in model.graph.node} - {"", "ai.onnx"}
    assert not domains, f"quantize_dynamic emitted non-standard ops: {domains}"
    model.doc_string = "Tiny BERT after onnxruntime quantize_dynamic(weight_type=QInt8, reduce_range=True)."
    return model


# ======================================================================================
# QDQ MLP (quantization-aware-training style export, opset 13)
# ======================================================================================
def build_qdq_mlp() -> onnx.ModelProto:
    b = Builder(opset=13, seed=4)

    def qdq_act(x, scale, zero_point, name):  # uint8 per-tensor fake quantization of an activation
        s = b.init(name + ".scale", np.array(scale, np.float32))
        zp = b.init(name + ".zero_point", np.array(zero_point, np.uint8))
        return b.op("DequantizeLinear", b.op("QuantizeLinear", x, s, zp), s, zp)

    def dq_weight(name, w):  # int8 per-output-channel (axis=1 of [in, out]) symmetric weight
        scale = (np.abs(w).max(axis=0) / 127.0).astype(np.float32)
        q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        return b.op("DequantizeLinear", b.init(name + ".weight_quantized", q),
                    b.init(name + ".weight_scale", scale),
                    b.init(name + ".weight_zero_point", np.zeros_like(q[0])), axis=1)

    with b.scope("fc1"):
        x = qdq_act("x", 0.03, 128, "fc1.input")
        x = b.op("MatMul", x, dq_weight("fc1", b.randn(16, 32, std=0.25)))
        x = b.op("Add", x, b.init("fc1.bias", b.randn(32, std=0.1)))
    x = b.op("Relu", x)
    with b.scope("fc2"):
        x = qdq_act(x, 0.02, 0, "fc2.input")  # after Relu: zero point 0
        b.nodes.append(helper.make_node("MatMul", [x, dq_weight("fc2", b.randn(32, 8, std=0.18))], ["y"],
                                        name="/fc2/MatMul"))
    return b.model(
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch_size", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch_size", 8])],
        "Tiny QDQ MLP: uint8 per-tensor activations, int8 per-channel weights, opset 13.",
    )


def build_qdq_static_mlp() -> onnx.ModelProto:
    """An f32 MLP through onnxruntime's own quantize_static (QDQ format, uint8 activations with
    zero points from min-max calibration, int8 per-channel weights): the QDQ graph that tool writes
    (it drops the Relu, the uint8 zero point 0 after it clips), for the qdq-activations pass."""
    b = Builder(opset=17, seed=8)
    with b.scope("fc1"):
        x = b.op("MatMul", "x", b.init("fc1.weight", b.randn(24, 40, std=0.2)))
        x = b.op("Add", x, b.init("fc1.bias", b.randn(40, std=0.1)))
    x = b.op("Relu", x)
    with b.scope("fc2"):
        x = b.op("MatMul", x, b.init("fc2.weight", b.randn(40, 16, std=0.15)))
        b.nodes.append(helper.make_node("Add", [x, b.init("fc2.bias", b.randn(16, std=0.1))], ["y"], name="/fc2/Add"))
    f32 = b.model(
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch_size", 24])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch_size", 16])],
        "",
    )
    rng = np.random.default_rng(9)
    batches = [{"x": rng.standard_normal((4, 24)).astype(np.float32)} for _ in range(8)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "mlp.onnx"), Path(tmp, "mlp_qdq.onnx")
        onnx.save_model(f32, src)
        logging.disable(logging.WARNING)
        quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        logging.disable(logging.NOTSET)
        model = onnx.load_model(dst)
    model.doc_string = ("Tiny MLP after onnxruntime quantize_static(QDQ, per_channel=True, QUInt8 activations, "
                        "QInt8 weights), min-max calibration on 32 random rows.")
    return model


def pack_nbits(w: np.ndarray, bits: int, block: int, asym: bool):
    """onnxruntime's MatMulNBits operands for a [K, N] weight, written here independently of edgec:
    B u8 [N, blocks, block*bits/8] (low nibble first), scales f32 [N*blocks], packed zero points."""
    k, n = w.shape
    blocks = -(-k // block)
    wp = np.zeros((blocks * block, n), np.float32)
    wp[:k] = w
    wb = wp.T.reshape(n, blocks, block)
    qmax = (1 << bits) - 1
    if asym:
        lo, hi = np.minimum(wb.min(-1), 0), np.maximum(wb.max(-1), 0)
        scale = np.where(hi > lo, (hi - lo) / qmax, 1.0).astype(np.float32)
        zero = np.clip(np.round(-lo / scale), 0, qmax).astype(np.uint8)
    else:
        scale = (np.abs(wb).max(-1) / (qmax // 2)).astype(np.float32)
        zero = np.full((n, blocks), 1 << (bits - 1), np.uint8)
    q = np.clip(np.round(wb / scale[..., None]) + zero[..., None], 0, qmax).astype(np.uint8)
    if bits == 4:
        q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
        if blocks % 2:
            zero = np.concatenate([zero, np.zeros((n, 1), np.uint8)], 1)
        zero = (zero[:, 0::2] | (zero[:, 1::2] << 4)).astype(np.uint8)
    return q, scale.reshape(-1), zero.reshape(-1)


def build_nbits_mlp() -> onnx.ModelProto:
    """onnxruntime's contrib MatMulNBits: asymmetric 4-bit with a partial last block, symmetric
    4-bit, and 8-bit with zero points."""
    b = Builder(opset=17, seed=6)
    x = "x"
    for i, (k, n, bits, block, asym) in enumerate([(72, 40, 4, 32, True), (40, 24, 4, 16, False),
                                                   (24, 20, 8, 16, True)]):
        q, scale, zero = pack_nbits(b.randn(k, n, std=0.3), bits, block, asym)
        ins = [x, b.init(f"fc{i}.q", q), b.init(f"fc{i}.scales", scale)]
        if asym:
            ins.append(b.init(f"fc{i}.zero_points", zero))
        out = "y" if i == 2 else f"fc{i}_out"
        b.nodes.append(helper.make_node("MatMulNBits", ins, [out], name=f"/fc{i}/MatMulNBits",
                                        domain="com.microsoft", K=k, N=n, bits=bits, block_size=block))
        x = out if i == 2 else b.op("Relu", out)
    m = b.model(
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch_size", 3, 72])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch_size", 3, 20])],
        "Tiny MLP of onnxruntime MatMulNBits (com.microsoft) layers: 4-bit asym (K=72, block 32), "
        "4-bit sym (block 16), 8-bit asym.",
    )
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return m


# ======================================================================================
# Inputs, expected outputs, checks, README
# ======================================================================================
def lm_inputs(with_positions=False, with_token_types=False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    mask = np.ones((BATCH, SEQ), np.int64)
    mask[1, :2] = 0  # row 1 is left-padded
    ids = np.where(mask == 1, rng.integers(1, 128, (BATCH, SEQ)), 0).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": mask}
    if with_positions:  # transformers: cumsum(mask) - 1, padding positions filled with 1
        feeds["position_ids"] = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1).astype(np.int64)
    if with_token_types:
        feeds["token_type_ids"] = (np.arange(SEQ)[None] >= 4).repeat(BATCH, 0).astype(np.int64)
    return feeds


def run_ort(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def write_fixture(name: str, model: onnx.ModelProto, feeds, external=False) -> dict[str, np.ndarray]:
    d = OUT / name
    shutil.rmtree(d, ignore_errors=True)  # external data is appended to, so start clean
    (d / "inputs").mkdir(parents=True)
    (d / "expected").mkdir()
    path = d / "model.onnx"
    if external:  # saving converts the proto in place, so save a copy
        model = onnx.ModelProto.FromString(model.SerializeToString())
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
    else:
        onnx.save_model(model, path)
    onnx.checker.check_model(str(path), full_check=True)  # includes strict shape inference
    outputs = run_ort(path, feeds)
    for k, v in feeds.items():
        np.save(d / "inputs" / f"{k}.npy", v)
    for k, v in outputs.items():
        if not np.isfinite(v).all():
            raise SystemExit(f"{name}: output {k} has NaN/Inf")
        np.save(d / "expected" / f"{k}.npy", v)
    return outputs


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in model.graph.node)


def main():
    OUT.mkdir(exist_ok=True)
    llama, llama_w = build_llama()
    bert = build_bert()
    mlp_x = np.random.default_rng(5).standard_normal((BATCH, 16)).astype(np.float32)
    models = {
        "llama": (llama, lm_inputs(with_positions=True), False),
        "llama_ext": (llama, lm_inputs(with_positions=True), True),
        "gpt2": (build_gpt2(), lm_inputs(), False),
        "bert": (bert, lm_inputs(with_token_types=True), False),
        "bert_int8": (build_bert_int8(bert), lm_inputs(with_token_types=True), False),
        "qdq_mlp": (build_qdq_mlp(), {"x": mlp_x}, False),
        "qdq_static_mlp": (build_qdq_static_mlp(),
                           {"x": np.random.default_rng(10).standard_normal((4, 24)).astype(np.float32)}, False),
        "nbits_mlp": (build_nbits_mlp(),
                      {"x": np.random.default_rng(7).standard_normal((BATCH, 3, 72)).astype(np.float32)}, False),
    }
    results = {}
    for name, (model, feeds, external) in models.items():
        results[name] = write_fixture(name, model, feeds, external)

    # The llama graph must compute exactly a Llama: compare with the plain numpy forward pass.
    feeds = models["llama"][1]
    ref = llama_numpy(llama_w, feeds["input_ids"], feeds["attention_mask"], feeds["position_ids"])
    for name in ("llama", "llama_ext"):
        err = np.abs(results[name]["logits"] - ref).max()
        if err > 1e-4:
            raise SystemExit(f"{name}: ORT logits differ from the numpy Llama by {err:.3g}")
    err = np.abs(results["llama"]["logits"] - ref).max()
    print(f"llama: ORT vs numpy reference max |diff| = {err:.2e}")
    if not np.array_equal(results["llama"]["logits"], results["llama_ext"]["logits"]):
        raise SystemExit("llama_ext: outputs differ from llama")

    lines = ["# Tiny transformer fixtures", "",
             "Generated by `models/make-tiny-models.sh` (`models/make_tiny_models.py`); do not edit.",
             f"Inputs are batch {BATCH}, sequence {SEQ}; row 1 of attention_mask is left-padded with",
             f"2 zeros. `expected/` holds onnxruntime {ort.__version__} outputs (CPU EP, graph",
             "optimizations disabled).", ""]
    total = 0
    for name, (model, feeds, _) in models.items():
        files = sorted(p for p in (OUT / name).rglob("*") if p.is_file())
        size = sum(p.stat().st_size for p in files)
        model_files = [p for p in files if p.parent == OUT / name]
        total += size
        ops = op_counts(model)
        lines += [f"## {name}", "", model.doc_string, "",
                  f"- opset {model.opset_import[0].version}, {len(model.graph.node)} nodes, "
                  f"{len(model.graph.initializer)} initializers",
                  f"- inputs: {', '.join(feeds)}; outputs: {', '.join(results[name])}",
                  "- files: " + ", ".join(f"`{p.name}` {p.stat().st_size:,} B" for p in model_files)
                  + f" (with inputs/expected: {size:,} B)",
                  "- ops: " + ", ".join(f"{op} {n}" for op, n in sorted(ops.items())), ""]
    lines.append(f"Total size: {total:,} bytes.")
    (OUT / "README.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {len(models)} models to {OUT} ({total:,} bytes)")


def write_llama_135m(out: Path, seq: int, check_ort: bool):
    """The Llama graph at SmolLM2-135M's size, batch 1: for speed benchmarks, not a fixture."""
    c = LLAMA_135M
    assert seq <= c["max_pos"]
    t0 = time.perf_counter()
    model, W = build_llama(c, seed=135)
    n_params = sum(w.size for w in W.values())
    (out / "inputs").mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    for f in (path, out / "model.onnx.data"):  # external data is appended to, so start clean
        f.unlink(missing_ok=True)
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    del model
    onnx.checker.check_model(str(path), full_check=True)
    feeds = {"input_ids": np.random.default_rng(1234).integers(0, c["vocab"], (1, seq)).astype(np.int64),
             "attention_mask": np.ones((1, seq), np.int64),
             "position_ids": np.arange(seq, dtype=np.int64)[None]}
    for k, v in feeds.items():
        np.save(out / "inputs" / f"{k}.npy", v)
    size = sum(f.stat().st_size for f in (path, out / "model.onnx.data"))
    (out / "model.json").write_text(json.dumps(dict(parameters=int(n_params), seq=seq, seed=135, **c)) + "\n")
    print(f"wrote {path} ({n_params:,} parameters, {size:,} B with data, T={seq}) "
          f"in {time.perf_counter() - t0:.1f} s")
    if not check_ort:
        return
    t0 = time.perf_counter()
    logits = run_ort(path, feeds)["logits"]
    print(f"onnxruntime (ORT_DISABLE_ALL, 1 thread, incl. session creation): {time.perf_counter() - t0:.2f} s")
    (out / "expected").mkdir(exist_ok=True)
    np.save(out / "expected" / "logits.npy", logits)
    ref = llama_numpy(W, feeds["input_ids"], feeds["attention_mask"], feeds["position_ids"], c)
    print(f"ORT vs numpy float64 reference: max |diff| = {np.abs(logits - ref).max():.2e} "
          f"(logits max |x| {np.abs(ref).max():.2f})")
    edgec = REPO / "target" / "release" / "edgec"
    if not edgec.exists():
        print(f"{edgec} not built: skipping the edgec comparison")
        return
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(edgec), "run", str(path), "--output-dir", tmp]
        cmd += [a for k in feeds for a in ("-i", f"{k}={out / 'inputs' / f'{k}.npy'}")]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"edgec failed:\n{run.stderr}")
        ours = np.load(Path(tmp) / "logits.npy")
    print(f"edgec: {run.stderr.strip()}")
    print(f"edgec vs ORT: max |diff| = {np.abs(ours - logits).max():.2e}; "
          f"vs numpy float64: {np.abs(ours - ref).max():.2e}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-135m", nargs="?", type=Path, const=REPO / "data" / "bench" / "llama135m",
                    metavar="OUT_DIR", help="write only the SmolLM2-135M-sized Llama benchmark model "
                    "(default OUT_DIR: data/bench/llama135m)")
    ap.add_argument("--seq", type=int, default=32, help="sequence length of the --llama-135m inputs")
    ap.add_argument("--check-ort", action="store_true", help="with --llama-135m: run onnxruntime and "
                    "compare it with a numpy reference and target/release/edgec (if built)")
    args = ap.parse_args()
    if (args.check_ort or args.seq != 32) and not args.llama_135m:
        ap.error("--check-ort and --seq only apply to --llama-135m")
    if args.llama_135m:
        write_llama_135m(args.llama_135m.resolve(), args.seq, args.check_ort)
    else:
        main()

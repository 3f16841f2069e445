"""A tiny Llama in SmolLM2's exact export shapes (full sequence, decoder with past, no-mask
variant), with random weights, for tests of the KV-cache path (models/tiny-lm).

    .venv/bin/python models/make_tiny_lm.py [OUT_DIR]

Reuses models/smollm2.py's graph builder, so the graphs have the same structure as the real model's;
only the sizes differ (2 layers, hidden 32, 4 query / 2 KV heads of 8, FFN 48, vocab 96).
Deterministic (seed 0).
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smollm2  # noqa: E402

C = dict(layers=2, heads=4, kv_heads=2, head_dim=8, hidden=32, ffn=48, vocab=96, eps=1e-5, theta=10000.0)


def weights(c):
    rng = np.random.default_rng(0)
    d, hd, f = c["hidden"], c["head_dim"], c["ffn"]

    def w(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    W = {"model.embed_tokens.weight": w(c["vocab"], d, scale=1.0)}
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        W[p + "input_layernorm.weight"] = 1 + w(d, scale=0.1)
        W[p + "self_attn.q_proj.weight"] = w(c["heads"] * hd, d)
        W[p + "self_attn.k_proj.weight"] = w(c["kv_heads"] * hd, d)
        W[p + "self_attn.v_proj.weight"] = w(c["kv_heads"] * hd, d)
        W[p + "self_attn.o_proj.weight"] = w(d, c["heads"] * hd)
        W[p + "post_attention_layernorm.weight"] = 1 + w(d, scale=0.1)
        W[p + "mlp.gate_proj.weight"] = w(f, d)
        W[p + "mlp.up_proj.weight"] = w(f, d)
        W[p + "mlp.down_proj.weight"] = w(d, f)
    W["model.norm.weight"] = 1 + w(d, scale=0.1)
    return W


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "tiny-lm"
    out.mkdir(parents=True, exist_ok=True)
    index = smollm2.write_data_file(out / smollm2.DATA_FILE, smollm2.onnx_weights(weights(C)))
    for kind, name in (("full", "model.onnx"), ("past", "decoder_with_past.onnx"), ("nomask", "model_nomask.onnx")):
        m = smollm2.build_graph(kind, C, index)
        m.doc_string = f"Tiny random-weight Llama in SmolLM2's {kind} export layout (models/make_tiny_lm.py)."
        (out / name).write_bytes(m.SerializeToString())
        print(f"{out / name}: {len(m.graph.node)} nodes")


if __name__ == "__main__":
    main()

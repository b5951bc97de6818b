#!/usr/bin/env python3
"""Writes a Qwen3-MoE checkpoint (transformers layout: config.json, *.safetensors,
tokenizer.json) as a GGUF file that llama.cpp loads as its ``qwen3moe`` architecture,
tokenizer included.

    python3 llamacpp/export_gguf.py --model checkpoints/tiny-moe -o tiny-moe.f32.gguf
    python3 llamacpp/export_gguf.py --model checkpoints/tiny-moe --dtype f16 -o tiny-moe.f16.gguf

Needs numpy and the ``gguf`` package (llama.cpp's own GGUF writer, pip install gguf); no
torch. Matrices are written in ``--dtype`` (f32: bf16 checkpoints convert exactly; f16;
bf16), norms and the router always in f32, as llama.cpp's converter does. Tensor data
is aligned to 4096 bytes, so each expert's slice of ``ffn_{gate,up,down}_exps`` starts on
a page of its own when its size is a multiple of 4096 (the prefetcher, which stages and
drops experts by byte range, checks).

A config field llama.cpp's ``qwen3moe`` graph does not implement is refused by name
(``rope_scaling``, ``norm_topk_prob`` not true, ``mlp_only_layers``, ``decoder_sparse_step``,
``use_sliding_window``, ``attention_bias``, ``hidden_act`` other than SiLU), as is a
tokenizer other than byte-level BPE with the GPT-2 split. The checkpoint is read into
memory as float32 (four times a bf16 checkpoint's size).
"""

import argparse
import json
import os
import struct
import sys

import numpy as np

PAGE = 4096


class ExportError(Exception):
    """A checkpoint this exporter cannot write, with the file and the reason."""


def read_safetensors(path):
    """{name: float32 array} of one .safetensors file (BF16, F16 and F32 tensors)."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ExportError(f"{path}: shorter than a safetensors header")
    n = struct.unpack("<Q", raw[:8])[0]
    try:
        header = json.loads(raw[8 : 8 + n])
    except ValueError as e:
        raise ExportError(f"{path}: header is not JSON: {e}") from None
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        buf = raw[base + start : base + end]
        dtype, shape = info["dtype"], info["shape"]
        if dtype == "BF16":
            a = (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        elif dtype == "F16":
            a = np.frombuffer(buf, dtype="<f2").astype(np.float32)
        elif dtype == "F32":
            a = np.frombuffer(buf, dtype="<f4").copy()
        else:
            raise ExportError(f"{path}: tensor {name}: dtype {dtype} not supported (BF16, F16, F32)")
        if a.size != int(np.prod(shape)):
            raise ExportError(f"{path}: tensor {name}: {a.size} values for shape {shape}")
        out[name] = a.reshape(shape)
    return out


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: {e}") from None


def load_checkpoint(model_dir):
    """(config dict, {tensor name: float32 array}) of a checkpoint directory."""
    cfg = read_json(os.path.join(model_dir, "config.json"))
    files = sorted(p for p in os.listdir(model_dir) if p.endswith(".safetensors"))
    if not files:
        raise ExportError(f"{model_dir}: no .safetensors files")
    tensors = {}
    for p in files:
        tensors.update(read_safetensors(os.path.join(model_dir, p)))
    return cfg, tensors


def check_config(cfg, cfg_path):
    """Refuses what llama.cpp's qwen3moe graph would silently compute differently."""
    if cfg.get("model_type") != "qwen3_moe":
        raise ExportError(f"{cfg_path}: model_type {cfg.get('model_type')!r}: only qwen3_moe is exported")
    refuse = [
        ("rope_scaling", cfg.get("rope_scaling") not in (None, {}), "RoPE scaling is not exported"),
        ("rope_parameters", (cfg.get("rope_parameters") or {}).get("rope_type", "default") != "default",
         "RoPE scaling is not exported"),
        ("norm_topk_prob", cfg.get("norm_topk_prob") is not True,
         "llama.cpp's qwen3moe always renormalises the top-k weights"),
        ("mlp_only_layers", bool(cfg.get("mlp_only_layers")), "dense layers are not in llama.cpp's qwen3moe"),
        ("decoder_sparse_step", cfg.get("decoder_sparse_step", 1) != 1, "every layer must be MoE"),
        ("use_sliding_window", bool(cfg.get("use_sliding_window")), "sliding-window attention"),
        ("attention_bias", bool(cfg.get("attention_bias")), "attention biases"),
        ("hidden_act", cfg.get("hidden_act", "silu") != "silu", "llama.cpp's qwen3moe experts use SiLU"),
    ]
    for field, bad, why in refuse:
        if bad:
            raise ExportError(f"{cfg_path}: field {field} = {cfg.get(field)!r} not supported: {why}")


def experts_of(tensors, layer, n_experts):
    """Stacked (gate, up, down) expert weights of one layer: [E, ff, d], [E, ff, d], [E, d, ff]."""
    p = f"model.layers.{layer}.mlp.experts"
    if f"{p}.gate_up_proj" in tensors:
        gu, down = tensors[f"{p}.gate_up_proj"], tensors.get(f"{p}.down_proj")
        if gu.ndim != 3 or gu.shape[0] != n_experts or gu.shape[1] % 2 or down is None:
            raise ExportError(f"layer {layer}: fused experts gate_up_proj {list(gu.shape)} is not "
                              f"[{n_experts}, 2 x intermediate, hidden] with a down_proj beside it")
        ff = gu.shape[-2] // 2
        return gu[:, :ff, :], gu[:, ff:, :], down
    try:
        stack = lambda w: np.stack([tensors[f"{p}.{e}.{w}.weight"] for e in range(n_experts)])
        return stack("gate_proj"), stack("up_proj"), stack("down_proj")
    except KeyError as e:
        raise ExportError(f"layer {layer}: expert tensor {e.args[0]} missing") from None


def vocab_of(model_dir, cfg):
    """(tokens, token types, merges, add_bos) from tokenizer.json / tokenizer_config.json."""
    path = os.path.join(model_dir, "tokenizer.json")
    tok = read_json(path)
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(f"{path}: model.type {model.get('type')!r}: only byte-level BPE is exported")
    pre = tok.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        raise ExportError(f"{path}: pre_tokenizer {pre!r}: only ByteLevel with the GPT-2 regex is exported")
    if tok.get("normalizer"):
        raise ExportError(f"{path}: normalizer {tok['normalizer']!r} not supported")
    n_vocab = int(cfg["vocab_size"])
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [5] * n_vocab  # UNUSED until a vocabulary entry fills it
    for text, i in model["vocab"].items():
        if i >= n_vocab:
            raise ExportError(f"{path}: token {text!r} has id {i} >= vocab_size {n_vocab}")
        tokens[i], types[i] = text, 1  # NORMAL
    for added in tok.get("added_tokens", []):
        i = added["id"]
        if i >= n_vocab:
            raise ExportError(f"{path}: added token {added['content']!r} has id {i} >= vocab_size {n_vocab}")
        tokens[i], types[i] = added["content"], 3 if added.get("special") else 4  # CONTROL / USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    add_bos = False
    tc = os.path.join(model_dir, "tokenizer_config.json")
    if os.path.exists(tc):
        add_bos = bool(read_json(tc).get("add_bos_token", False))
    return tokens, types, merges, add_bos


def export(model_dir, out_path, dtype="f32", tokenizer_dir=None):
    """Writes the GGUF file atomically (the tokenizer from `tokenizer_dir`, default the
    checkpoint's own); returns its tensor count."""
    import gguf

    cfg_path = os.path.join(model_dir, "config.json")
    cfg, tensors = load_checkpoint(model_dir)
    check_config(cfg, cfg_path)
    tokens, types, merges, add_bos = vocab_of(tokenizer_dir or model_dir, cfg)
    n_layers, n_experts = int(cfg["num_hidden_layers"]), int(cfg["num_experts"])
    n_heads, hidden = int(cfg["num_attention_heads"]), int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // n_heads)
    mat = {"f32": np.float32, "f16": np.float16}
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype]

    tmp = out_path + ".partial"
    w = gguf.GGUFWriter(tmp, "qwen3moe")
    w.add_custom_alignment(PAGE)
    w.add_name(os.path.basename(os.path.normpath(model_dir)))
    w.add_file_type(int(ftype))
    w.add_context_length(int(cfg["max_position_embeddings"]))
    w.add_embedding_length(hidden)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(int(cfg.get("intermediate_size", cfg["moe_intermediate_size"])))
    w.add_expert_feed_forward_length(int(cfg["moe_intermediate_size"]))
    w.add_head_count(n_heads)
    w.add_head_count_kv(int(cfg["num_key_value_heads"]))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_expert_count(n_experts)
    w.add_expert_used_count(int(cfg["num_experts_per_tok"]))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if cfg.get("bos_token_id") is not None:
        w.add_bos_token_id(int(cfg["bos_token_id"]))
    if cfg.get("eos_token_id") is not None:
        eos = cfg["eos_token_id"]
        w.add_eos_token_id(int(eos[0] if isinstance(eos, list) else eos))
    w.add_add_bos_token(add_bos)

    def put(name, a, matrix=True):
        a = np.ascontiguousarray(a)
        if not matrix or dtype == "f32":
            w.add_tensor(name, a.astype(np.float32))
        elif dtype == "f16":
            w.add_tensor(name, a.astype(mat["f16"]))
        else:  # bf16: round to nearest even, stored as raw uint16
            u = a.astype(np.float32).view(np.uint32)
            b = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
            w.add_tensor(name, b, raw_shape=a.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)

    def get(name):
        if name not in tensors:
            raise ExportError(f"{model_dir}: tensor {name} missing")
        return tensors[name]

    put("token_embd.weight", get("model.embed_tokens.weight"))
    put("output_norm.weight", get("model.norm.weight"), matrix=False)
    if not cfg.get("tie_word_embeddings", False):
        put("output.weight", get("lm_head.weight"))
    for l in range(n_layers):
        p = f"model.layers.{l}"
        put(f"blk.{l}.attn_norm.weight", get(f"{p}.input_layernorm.weight"), matrix=False)
        put(f"blk.{l}.attn_q.weight", get(f"{p}.self_attn.q_proj.weight"))
        put(f"blk.{l}.attn_k.weight", get(f"{p}.self_attn.k_proj.weight"))
        put(f"blk.{l}.attn_v.weight", get(f"{p}.self_attn.v_proj.weight"))
        put(f"blk.{l}.attn_output.weight", get(f"{p}.self_attn.o_proj.weight"))
        put(f"blk.{l}.attn_q_norm.weight", get(f"{p}.self_attn.q_norm.weight"), matrix=False)
        put(f"blk.{l}.attn_k_norm.weight", get(f"{p}.self_attn.k_norm.weight"), matrix=False)
        put(f"blk.{l}.ffn_norm.weight", get(f"{p}.post_attention_layernorm.weight"), matrix=False)
        put(f"blk.{l}.ffn_gate_inp.weight", get(f"{p}.mlp.gate.weight"), matrix=False)
        gate, up, down = experts_of(tensors, l, n_experts)
        put(f"blk.{l}.ffn_gate_exps.weight", gate)
        put(f"blk.{l}.ffn_up_exps.weight", up)
        put(f"blk.{l}.ffn_down_exps.weight", down)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out_path)
    return len(tensors)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    ap.add_argument("--dtype", choices=["f32", "f16", "bf16"], default="f32", help="matrix type (norms stay f32)")
    ap.add_argument("--tokenizer", help="directory whose tokenizer.json to use (default: --model's; "
                    "for checkpoints without one, such as `moecast checkpoint synth`'s)")
    ap.add_argument("-o", "--output", required=True, help="GGUF file to write")
    args = ap.parse_args(argv)
    try:
        export(args.model, args.output, args.dtype, args.tokenizer)
    except (ExportError, OSError) as e:
        if os.path.exists(args.output + ".partial"):
            os.unlink(args.output + ".partial")
        print(f"error: {e}", file=sys.stderr)
        return 1
    size = os.path.getsize(args.output)
    print(f"wrote {args.output} ({size / 1e6:.1f} MB, {args.dtype}, llama.cpp architecture qwen3moe)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

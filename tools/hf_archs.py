"""The tiny Hugging Face MoE models of ``hf_fixtures.py``: their shapes (one entry per
architecture, plus RoPE-scaled variants), the router each one uses, and how a model is
built from a seed with no parameter left at a no-op value."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 272
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>"]  # ids 0, 1, 2
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=24,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.2,
    tie_word_embeddings=False,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
)

ARCHS = {
    "mixtral": dict(
        add_bos=True,
        config=dict(
            num_hidden_layers=3,
            intermediate_size=8,
            num_local_experts=8,
            num_experts_per_tok=2,
            sliding_window=None,
        ),
    ),
    "qwen2_moe": dict(
        add_bos=False,
        config=dict(
            num_hidden_layers=3,
            intermediate_size=16,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=16,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            qkv_bias=True,
            use_sliding_window=False,
        ),
    ),
    "qwen3_moe": dict(
        add_bos=False,
        config=dict(
            num_hidden_layers=3,
            head_dim=8,  # != hidden/heads, like the published Qwen3 MoE models
            intermediate_size=16,
            moe_intermediate_size=8,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
            use_sliding_window=False,
        ),
    ),
    "olmoe": dict(
        add_bos=False,
        config=dict(
            num_hidden_layers=3,
            num_key_value_heads=4,  # MHA like the OLMoE release (q_norm/k_norm span all heads)
            intermediate_size=8,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        ),
    ),
    "deepseek_v2": dict(
        add_bos=True,
        config=dict(
            num_hidden_layers=3,
            num_key_value_heads=4,
            intermediate_size=16,
            moe_intermediate_size=8,
            n_routed_experts=8,
            n_shared_experts=2,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            topk_method="group_limited_greedy",
            n_group=2,  # 2 groups of 4 experts, keep 1 group: the limit really changes the choice
            topk_group=1,
            routed_scaling_factor=1.5,
            norm_topk_prob=False,
            q_lora_rank=None,  # V2-Lite style plain q_proj
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=8,
        ),
    ),
    "deepseek_v3": dict(
        add_bos=True,
        config=dict(
            num_hidden_layers=3,
            num_key_value_heads=4,
            intermediate_size=16,
            moe_intermediate_size=8,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=3,
            first_k_dense_replace=1,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            q_lora_rank=24,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=8,
            num_nextn_predict_layers=0,
        ),
    ),
    "gpt_oss": dict(
        add_bos=False,
        # re-drawn after init: larger sinks so they matter, larger gate_up so that the
        # swiglu clamp (limit 7) is actually hit by some activations
        std_override={"self_attn.sinks": 1.0, "mlp.experts.gate_up_proj": 0.5},
        config=dict(
            num_hidden_layers=4,
            head_dim=8,  # != hidden/heads, like the published gpt-oss
            intermediate_size=8,
            num_local_experts=8,
            num_experts_per_tok=3,
            sliding_window=6,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            max_position_embeddings=131072,  # default; YaRN rope kept as published
            attention_bias=True,
        ),
    ),
}


# ----------------------------------------------------------------------------- model build


# RoPE-scaled variants of the Llama-family architectures: the same model shape with
# ``rope_parameters`` set as users set them for long context (linear interpolation, YaRN).
# Fixture sequences are short (< 40 positions), so YaRN's original context is set to 16
# positions: its ramp then changes the frequencies the fixtures exercise, and its
# attention factor (0.1 ln(factor) + 1) scales every logit.
ROPE_SCALING = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
}
VARIANTS = {
    f"{arch}_rope_{kind}": (arch, kind)
    for arch in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
    for kind in ROPE_SCALING
}


# Sliding-window variants of the Llama-family architectures that have one: the window
# (5 positions) is shorter than the fixtures' prompts, so it masks keys in prefill and
# decode. Mixtral and Qwen3-MoE slide on every layer; Qwen2-MoE on the layers its
# ``layer_types`` rule picks (even layers below ``max_window_layers``: layer 0 here).
SLIDING = {
    "mixtral_sliding": ("mixtral", {"sliding_window": 5}),
    "qwen2_moe_sliding": ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 2}),
    "qwen3_moe_sliding": ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 5}),
}


def make_config(arch, rope=None, overrides=None):
    kw = dict(COMMON)
    kw.update(ARCHS[arch]["config"])
    kw.update(overrides or {})
    cfg = AutoConfig.for_model(arch, **kw)
    if rope is not None:
        params = dict(cfg.rope_parameters)
        params.update(ROPE_SCALING[rope])
        cfg.rope_parameters = params
        if getattr(cfg, "head_dim", None) is None:
            # transformers' YaRN reads config.head_dim, which Mixtral leaves unset
            cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    cfg.architectures = [MODEL_CLASS[arch]]
    return cfg


ROUTER_DOC = {
    "mixtral": "model.layers.{l}.mlp.gate (MixtralTopKRouter; on disk block_sparse_moe.gate): softmax(logits) -> "
    "top-k -> renormalise to sum 1",
    "qwen2_moe": "model.layers.{l}.mlp.gate (Qwen2MoeTopKRouter): softmax(logits) -> top-k probs, not renormalised "
    "(norm_topk_prob=false); shared expert added separately with sigmoid(shared_expert_gate(x))",
    "qwen3_moe": "model.layers.{l}.mlp.gate (Qwen3MoeTopKRouter): softmax(logits) -> top-k -> renormalise "
    "(norm_topk_prob=true)",
    "olmoe": "model.layers.{l}.mlp.gate (OlmoeTopKRouter): softmax(logits) -> top-k probs, not renormalised",
    "deepseek_v2": "model.layers.{l}.mlp.gate (DeepseekV2TopkRouter): p=softmax(logits); group_limited_greedy "
    "(group score = max p per group, keep topk_group groups); weights = p[ids] * routed_scaling_factor",
    "deepseek_v3": "model.layers.{l}.mlp.gate (DeepseekV3TopkRouter): s=sigmoid(logits); choice=s+"
    "e_score_correction_bias; group score = sum of top-2 choice per group, keep topk_group groups; ids = top-k "
    "choice; weights = s[ids]/(sum+1e-20) * routed_scaling_factor",
    "gpt_oss": "model.layers.{l}.mlp.router (GptOssTopKRouter): logits = xW^T+b; ids = top-k logits; weights = "
    "softmax over the k selected logits",
}

MODEL_CLASS = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
}

LOAD_KW = dict(attn_implementation="eager", experts_implementation="eager")


@torch.no_grad()
def build_model(arch, seed, rope=None, overrides=None):
    cfg = make_config(arch, rope, overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, **LOAD_KW)
    # _init_weights leaves norms at 1 and biases / sinks / correction biases at 0;
    # randomise them so a reimplementation that ignores one of them fails the test.
    g = torch.Generator().manual_seed(seed + 1_000_003)
    std = cfg.initializer_range
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if not p.is_floating_point() or "inv_freq" in name:
            continue
        if torch.all(p == 1):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        elif torch.all(p == 0):
            s = 0.1 if "e_score_correction_bias" in name else std
            p.copy_(s * torch.randn(p.shape, generator=g))
    for name, p in model.named_parameters():
        for suffix, s in ARCHS[arch].get("std_override", {}).items():
            if name.endswith(suffix):
                p.copy_(s * torch.randn(p.shape, generator=g))
    model.eval()
    return model

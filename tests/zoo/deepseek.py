"""DeepSeek-V2 and V3 against their native transformers classes, at EP=2 and TP=2 x EP=2 too.

Every structural switch: MLA with a low-rank query (V3) and without (q_lora_rank null, V2-Lite);
YaRN with mscale (V3) and plain RoPE (V2); a dense first layer (first_k_dense_replace); shared
experts; V2's softmax routing limited to the best groups; V3's sigmoid routing with a non-zero
e_score_correction_bias, groups and routed_scaling_factor; V3's multi-token-prediction layer in
the checkpoint (kept beside the converted checkpoint: the round trips check it comes back).
"""

from zoo import MOE, Case, native

# DeepSeek chooses on scores (softmax probabilities; sigmoid + bias), not logits: values near
# 0.1 whose oracle-vs-Megatron rounding differences are ~1e-8, so 1e-5 is a wide margin still.
ROUTING_MARGIN = 1e-5


def _margin(scores, k: int) -> float:
    top = scores.topk(k + 1, dim=-1).values
    return (top[:, k - 1] - top[:, k]).min().item()


def _check_routing_margin(router, inputs, output) -> None:
    """The oracle's group and expert choices (from its own router logits and settings) have no
    near-tie: see zoo/moe.py."""
    import torch

    logits = output[0].float()
    v3 = hasattr(router, "e_score_correction_bias")
    scores = logits.sigmoid() + router.e_score_correction_bias if v3 else logits.softmax(-1)
    margins = []
    if getattr(router, "topk_method", "noaux_tc") != "greedy" and router.num_group > 1:
        grouped = scores.view(scores.shape[0], router.num_group, -1)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1) if v3 else grouped.max(-1).values
        margins.append(_margin(group_scores, router.topk_group))
        chosen = group_scores.topk(router.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)
        scores = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(1)
    margins.append(_margin(scores, router.top_k))
    if min(margins) < ROUTING_MARGIN:
        raise AssertionError(f"oracle routing has a near-tie (margin {min(margins):.2e} < "
                             f"{ROUTING_MARGIN}): pick another seed")

TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
            intermediate_size=96, moe_intermediate_size=24, vocab_size=1000,
            max_position_embeddings=256, rms_norm_eps=1e-5, kv_lora_rank=16,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
            first_k_dense_replace=1, tie_word_embeddings=False)


def routed(build):
    """The oracle of `build` with a random expert-choice bias (V3; zeros would not test it),
    checking every routing decision of its forwards for near-ties."""

    def build_checked():
        import torch

        model = build()
        gen = torch.Generator().manual_seed(7)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.rand(buf.shape, generator=gen) * 0.2)
        routers = [m for m in model.modules() if type(m).__name__.endswith("TopkRouter")]
        assert routers, "no router found in the oracle"
        for router in routers:
            # Initialised router weights give near-uniform softmax probabilities, whose top-k
            # differ by less than the margin: make the routing decisive.
            with torch.no_grad():
                router.weight.mul_(20)
            router.register_forward_hook(_check_routing_margin)
        return model

    return build_checked


def _save_with_mtp(model, hf_dir: str) -> None:
    """save_pretrained, plus a multi-token-prediction layer as DeepSeek-V3 checkpoints store it
    (layer num_hidden_layers: enorm, hnorm, eh_proj, shared_head, its own embedding copy and
    decoder-layer tensors), which transformers does not build."""
    import json
    import os

    import torch
    from safetensors.torch import load_file, save_file

    model.save_pretrained(hf_dir)
    path = os.path.join(hf_dir, "model.safetensors")
    tensors = load_file(path)
    cfg = model.config
    layer, h, v = f"model.layers.{cfg.num_hidden_layers}", cfg.hidden_size, cfg.vocab_size
    gen = torch.Generator().manual_seed(11)
    shapes = {"enorm.weight": (h,), "hnorm.weight": (h,), "eh_proj.weight": (h, 2 * h),
              "shared_head.norm.weight": (h,), "shared_head.head.weight": (v, h),
              "embed_tokens.weight": (v, h), "input_layernorm.weight": (h,),
              "self_attn.kv_a_proj_with_mqa.weight": (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h),
              "mlp.gate.e_score_correction_bias": (cfg.n_routed_experts,)}
    for name, shape in shapes.items():
        tensors[f"{layer}.{name}"] = torch.randn(shape, generator=gen)
    save_file(tensors, path, metadata={"format": "pt"})
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    config["num_nextn_predict_layers"] = 1
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


CASES = [
    Case("deepseek_v3",
         routed(native("DeepseekV3ForCausalLM", **TINY, q_lora_rank=32, n_shared_experts=1,
                       num_experts_per_tok=4, n_group=4, topk_group=2,
                       routed_scaling_factor=2.5, norm_topk_prob=True,
                       rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                        "factor": 4.0, "original_max_position_embeddings": 64,
                                        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
                                        "mscale_all_dim": 1.0})),
         save=_save_with_mtp, layouts=MOE, generate=True),
    Case("deepseek_v2_lite",
         routed(native("DeepseekV2ForCausalLM", seed=6, **TINY, q_lora_rank=None,
                       n_shared_experts=2, num_experts_per_tok=2,
                       topk_method="group_limited_greedy", n_group=4, topk_group=2,
                       routed_scaling_factor=1.5)),
         layouts=MOE, generate=True),
]

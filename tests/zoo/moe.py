"""Mixtral, Qwen2-MoE and Qwen3-MoE against their native transformers classes, at EP=2 and
TP=2 x EP=2 too.

Routing is discontinuous: a token whose k-th and (k+1)-th router logits almost tie could pick a
different expert in Megatron-Core than in the oracle, from rounding alone (logits differ by
~1e-7 between the two). Every oracle forward therefore checks that no routing decision is
closer than ROUTING_MARGIN, so a seed or config change that creates a near-tie fails here, with
this reason, instead of as a mismatch of logits.
"""

from zoo import MOE, Case, native

ROUTING_MARGIN = 1e-4

TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1000, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=1e6,
            num_experts_per_tok=2, tie_word_embeddings=False)


def _check_routing_margin(module, inputs, output) -> None:
    logits, k = output[0].float(), module.top_k
    top = logits.topk(k + 1, dim=-1).values
    margin = (top[:, k - 1] - top[:, k]).min().item()
    if margin < ROUTING_MARGIN:
        raise AssertionError(f"oracle routing has a near-tie (margin {margin:.2e} < "
                             f"{ROUTING_MARGIN}): parity would depend on rounding; pick another "
                             "seed")


def routed(build):
    """The oracle of `build`, checking every routing decision of its forwards for near-ties."""

    def build_checked():
        model = build()
        routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
        assert routers, "no router found in the oracle"
        for router in routers:
            router.register_forward_hook(_check_routing_margin)
        return model

    return build_checked


CASES = [
    Case("mixtral", routed(native("MixtralForCausalLM", **TINY, intermediate_size=96,
                                  num_local_experts=4, sliding_window=None)),
         layouts=MOE),
    # Mixtral 8x7B v0.1 first shipped sliding_window=4096: a window shorter than the test's
    # sequence (32), so that it matters.
    Case("mixtral_sliding", routed(native("MixtralForCausalLM", seed=2, **TINY,
                                          intermediate_size=96, num_local_experts=4,
                                          sliding_window=16)),
         layouts=MOE, generate=True),
    # Qwen1.5-MoE: softmax over all experts, top-k probabilities not renormalised; a shared
    # expert behind a sigmoid gate; q/k/v biases; expert and shared sizes differ.
    Case("qwen2_moe", routed(native("Qwen2MoeForCausalLM", **TINY, intermediate_size=96,
                                    num_experts=4, moe_intermediate_size=48,
                                    shared_expert_intermediate_size=80, norm_topk_prob=False)),
         layouts=MOE),
    # norm_topk_prob renormalises (Mixtral's routing, plus the shared expert): another spec.
    Case("qwen2_moe_norm_topk",
         routed(native("Qwen2MoeForCausalLM", seed=1, **TINY, intermediate_size=96,
                       num_experts=4, moe_intermediate_size=48,
                       shared_expert_intermediate_size=80, norm_topk_prob=True)),
         layouts=MOE),
    # Qwen3-MoE: q/k norms, head_dim not hidden / heads, no shared expert; a dense first layer
    # (mlp_only_layers, as in DeepSeek-style releases) and renormalised top-k ...
    Case("qwen3_moe_norm_topk",
         routed(native("Qwen3MoeForCausalLM", seed=1, **TINY, head_dim=32, intermediate_size=96,
                       num_experts=4, moe_intermediate_size=48, norm_topk_prob=True,
                       mlp_only_layers=[0])),
         layouts=MOE, generate=True),
    # ... and every second layer sparse (decoder_sparse_step=2), top-k probabilities as they are.
    Case("qwen3_moe_sparse_step",
         routed(native("Qwen3MoeForCausalLM", **TINY, head_dim=32, intermediate_size=80,
                       num_experts=4, moe_intermediate_size=48, norm_topk_prob=False,
                       decoder_sparse_step=2)),
         layouts=MOE),
]

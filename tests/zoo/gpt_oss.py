"""GPT-OSS against its native transformers class, at EP=2 and TP=2 x EP=2 too.

Every switch matters: attention sinks, q/k/v/o biases, router and expert biases drawn at a scale
where they move the output (transformers initialises most of them to zero); a sliding window
(8) shorter than the test's sequence (32) on alternating layers; YaRN with a factor and a
short original context (so that its ramp and attention factor change the frequencies and
scores), truncate false as released; the SwiGLU clamp (swiglu_limit) low enough that some
gate and up values are clamped; head_dim not hidden / heads; GQA. The router's decisions are
checked for near-ties as for the other MoE families (zoo/moe.py).
"""

from zoo import MOE, Case
from zoo.moe import routed

TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, intermediate_size=48, vocab_size=1000, num_local_experts=4,
            num_experts_per_tok=2, max_position_embeddings=256, rms_norm_eps=1e-5,
            sliding_window=8, swiglu_limit=0.5, tie_word_embeddings=False,
            rope_parameters={"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0,
                             "beta_slow": 1.0, "truncate": False,
                             "original_max_position_embeddings": 32, "rope_theta": 10000.0})


def gpt_oss(seed: int = 0, **changes):
    """A GptOssForCausalLM with every bias, the sinks and the norms random."""

    def build():
        import torch
        import transformers

        from zoo import randomize_norms

        torch.manual_seed(seed)
        model = transformers.GptOssForCausalLM(
            transformers.GptOssConfig(**{**TINY, **changes})).float().eval()
        randomize_norms(model)
        # Scales at which each of them moves the logits, and greedy generation is not one
        # token repeated (large input-independent biases would make it so).
        scales = {"sinks": 1.0, "bias": 0.1, "gate_up_proj": 0.2, "down_proj": 0.2,
                  "embed_tokens.weight": 0.5, "lm_head.weight": 0.5}
        with torch.no_grad():
            for name, p in model.named_parameters():
                if std := next((v for k, v in scales.items() if name.endswith(k)), None):
                    p.normal_(0.0, std)
            for layer in model.model.layers:
                # Initialised router weights give near-tied logits: make the routing decisive.
                layer.mlp.router.weight.mul_(20)
        return model

    return build


CASES = [
    Case("gpt_oss", routed(gpt_oss()), layouts=MOE, generate=True),
]

"""Baichuan-7B and Baichuan2-7B (RoPE) remote code, in their own format.

Oracles: transformers' LlamaForCausalLM (Baichuan-7B is Llama with q, k, v fused in W_pack), and
for Baichuan2 the same with an lm_head that L2-normalises its rows in every forward (NormHead).
The raw lm_head rows have norms far from 1, so a Megatron model without NormHead fails parity.
"""

import torch

from zoo import Case, native
from zoo.remote_format import llama_layer, save

TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
            intermediate_size=96, vocab_size=1000, max_position_embeddings=256,
            rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)


class NormHeadOracle(torch.nn.Linear):
    """Baichuan2's NormHead as a function: x @ normalize(W, rows).T."""

    def forward(self, x):
        return torch.nn.functional.linear(x, torch.nn.functional.normalize(self.weight))


def _baichuan2():
    model = native("LlamaForCausalLM", seed=3, **TINY)()
    head = NormHeadOracle(TINY["hidden_size"], TINY["vocab_size"], bias=False)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
    model.lm_head = head
    return model


def _save(architecture: str, extra: dict):
    def save_baichuan(oracle, hf_dir: str) -> None:
        cfg = oracle.config
        sd = oracle.state_dict()
        tensors = {n: sd[n] for n in ("model.embed_tokens.weight", "model.norm.weight",
                                      "lm_head.weight")}
        for i in range(cfg.num_hidden_layers):
            t = llama_layer(sd, i)
            p = f"model.layers.{i}"
            tensors[f"{p}.self_attn.W_pack.weight"] = torch.cat(
                [t[f"self_attn.{x}_proj.weight"] for x in "qkv"])
            for name in ("self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                         "mlp.down_proj.weight", "input_layernorm.weight",
                         "post_attention_layernorm.weight"):
                tensors[f"{p}.{name}"] = t[name]
        save(tensors, {
            "architectures": [architecture], "model_type": "baichuan",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads, "hidden_act": "silu",
            "max_position_embeddings": cfg.max_position_embeddings,
            "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": False,
            "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **extra,
        }, hf_dir)

    return save_baichuan


CASES = [
    Case("baichuan_7b", native("LlamaForCausalLM", seed=2, **TINY),
         save=_save("BaiChuanForCausalLM", {})),
    # Tiny Baichuan2 configs state what the released models' sizes imply (baichuan.py).
    Case("baichuan2_7b", _baichuan2,
         save=_save("BaichuanForCausalLM", {"position_embedding_type": "rope",
                                            "norm_head": True, "z_loss_weight": 0,
                                            "model_max_length": 256})),
]

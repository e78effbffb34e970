"""Baichuan-13B / Baichuan2-13B (remote code, ALiBi) against a reference forward written here.

transformers has no Baichuan class. `Reference` computes the published architecture with the
remote code's tensor names, independently of megatron-patch (its own ALiBi slopes included):
RMSNorm pre-norm layers, W_pack = [q; k; v], scores q.k / sqrt(d) plus slope_h * key position
under a causal mask, SwiGLU MLP, untied lm_head (Baichuan2: its rows normalised). The
checkpoint is written as the remote code saves it (config.json without a position-encoding
key: a hidden size other than 4096 means ALiBi).
"""

from __future__ import annotations

import json
import math
import os

from zoo import Case, Layout

CONFIG = dict(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=8, hidden_act="silu", model_max_length=256, rms_norm_eps=1e-6,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def slopes(n: int) -> list[float]:
    """ALiBi slopes, written from the paper: powers of 2^(-8/n) for n a power of two; otherwise
    those of the largest power of two below n, then every other slope of twice that."""
    if (n & (n - 1)) == 0:
        return [2 ** (-8 * (i + 1) / n) for i in range(n)]
    p = 2 ** int(math.log2(n))
    return slopes(p) + slopes(2 * p)[::2][: n - p]


def build_reference(config: dict):
    import torch
    from torch import nn

    class RMSNorm(nn.Module):
        def __init__(self, size, eps):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(size).uniform_(0.5, 1.5))
            self.eps = eps

        def forward(self, x):
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    h, f, heads = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
    eps = config["rms_norm_eps"]

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.W_pack = nn.Linear(h, 3 * h, bias=False)
            self.o_proj = nn.Linear(h, h, bias=False)

        def forward(self, x):
            b, s, _ = x.shape
            d = h // heads
            q, k, v = (t.view(b, s, heads, d).transpose(1, 2) for t in self.W_pack(x).chunk(3, -1))
            scores = q @ k.transpose(-1, -2) / math.sqrt(d)
            bias = torch.tensor(slopes(heads))[:, None, None] * torch.arange(s)[None, None, :]
            future = torch.full((s, s), float("-inf")).triu(1)
            probs = torch.softmax(scores + bias + future, dim=-1)
            return self.o_proj((probs @ v).transpose(1, 2).reshape(b, s, h))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = nn.Linear(h, f, bias=False)
            self.up_proj = nn.Linear(h, f, bias=False)
            self.down_proj = nn.Linear(f, h, bias=False)

        def forward(self, x):
            return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm = RMSNorm(h, eps)
            self.self_attn = Attention()
            self.post_attention_layernorm = RMSNorm(h, eps)
            self.mlp = MLP()

        def forward(self, x):
            x = x + self.self_attn(self.input_layernorm(x))
            return x + self.mlp(self.post_attention_layernorm(x))

    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(config["vocab_size"], h)
            self.layers = nn.ModuleList(Layer() for _ in range(config["num_hidden_layers"]))
            self.norm = RMSNorm(h, eps)

    class Reference(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Body()
            self.lm_head = nn.Linear(h, config["vocab_size"], bias=False)

        def forward(self, input_ids):
            x = self.model.embed_tokens(input_ids)
            for layer in self.model.layers:
                x = layer(x)
            head = self.lm_head.weight
            if config.get("norm_head"):  # Baichuan2: unit-length output rows, in every forward
                head = head / head.norm(dim=-1, keepdim=True)
            return self.model.norm(x) @ head.T

    def build():
        torch.manual_seed(0)
        model = Reference()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" not in name:
                    p.normal_(0, 0.05)
        return model.float().eval()

    return build


def save(config: dict):
    def write(model, hf_dir: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(hf_dir, exist_ok=True)
        save_file({n: t.contiguous() for n, t in model.state_dict().items()},
                  os.path.join(hf_dir, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(hf_dir, "config.json"), "w") as f:
            json.dump({"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan",
                       "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                                    "AutoModelForCausalLM":
                                        "modeling_baichuan.BaichuanForCausalLM"},
                       "torch_dtype": "float32", **config}, f, indent=2)

    return write


# 6 heads (not a power of two) at TP=2 in the second case: 3 heads per rank.
SIX_HEADS = dict(CONFIG, hidden_size=96, num_attention_heads=6)

# Baichuan2-13B: the same with NormHead (stated in config.json, as tiny configs must: see
# families/baichuan.py).
BAICHUAN2 = dict(CONFIG, norm_head=True)

CASES = [
    Case("baichuan13b_alibi", build_reference(CONFIG), save(CONFIG)),
    Case("baichuan2_13b_alibi", build_reference(BAICHUAN2), save(BAICHUAN2)),
    Case("baichuan13b_alibi_6heads", build_reference(SIX_HEADS), save(SIX_HEADS),
         layouts=(Layout(2, 1, sp=True),)),
]

"""GPT-OSS specifics: MXFP4 checkpoints imported dequantised (against transformers' own
dequantisation), the released config read into Megatron-Core settings, refusals by key, and the
stacked-experts transforms. (Parity at every layout, round trips and generation: test_zoo.py,
case zoo/gpt_oss.py; EP training: test_moe.py.)"""

import math
import os
import re

import harness
import pytest

# gpt-oss-20b's config.json as released (transformers 4.55 keys).
GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2880, "initial_context_length": 4096, "initializer_range": 0.02,
    "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
    "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8,
    "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
        "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                     "original_max_position_embeddings": 4096, "rope_type": "yarn",
                     "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128,
    "swiglu_limit": 7.0, "tie_word_embeddings": False, "use_cache": True,
    "vocab_size": 201088}


def test_released_config():
    from megatron_patch.models import family_for, rope

    args = family_for(GPT_OSS_20B).model_args(GPT_OSS_20B)
    assert (args.num_moe_experts, args.moe_router_topk, args.moe_ffn_hidden_size) == (32, 4, 2880)
    assert args.window_pattern == (1, 0) * 12 and args.sliding_window == 128
    assert args.add_bias_linear and args.add_qkv_bias and args.attention_sinks
    assert (args.activation, args.activation_clamp, args.glu_linear_offset) == (
        "quick_gelu", 7.0, 1.0)
    assert args.moe_router_pre_softmax is False  # top-k logits, softmax over them
    # YaRN's attention factor (0.1 ln 32 + 1) multiplies queries and keys: squared in the scale.
    assert args.softmax_scale == pytest.approx((0.1 * math.log(32) + 1) ** 2 / 8, rel=1e-12)
    # Hand-computed YaRN ends: the fastest frequency kept, the slowest divided by 32.
    params = family_for(GPT_OSS_20B).rope_parameters(GPT_OSS_20B)
    freqs = rope.inv_freq(params, 64)
    assert freqs[0] == 1.0 and freqs[-1] == pytest.approx(150000 ** (-62 / 64) / 32, rel=1e-6)


def test_yarn_frequencies_equal_transformers():
    """The frequencies and attention factor transformers computes, with and without
    truncation (DeepSeek-style configs truncate; GPT-OSS's do not)."""
    import torch
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_patch.models import family_for, rope

    for truncate in (False, True):
        cfg = {**GPT_OSS_20B, "rope_scaling": {**GPT_OSS_20B["rope_scaling"],
                                               "truncate": truncate}}
        hf = transformers.GptOssConfig(**{k: v for k, v in cfg.items()
                                          if k != "quantization_config"})
        expected, factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
        params = family_for(cfg).rope_parameters(cfg)
        assert torch.equal(rope.inv_freq(params, 64), expected), truncate
        assert rope.yarn_attention_factor(params) == factor


@pytest.mark.parametrize("changes, key", [
    ({"swiglu_alpha": 1.5}, "swiglu_alpha=1.5"),
    ({"attention_bias": False}, "attention_bias=False"),
    ({"layer_types": ["chunked_attention", "full_attention"] * 12}, "chunked_attention"),
    ({"layer_types": ["full_attention"] * 2}, "layer_types has 2 entries"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope_type='longrope'"),
    ({"rope_scaling": {**GPT_OSS_20B["rope_scaling"], "partial_rotary_factor": 0.5}},
     "partial_rotary_factor=0.5"),
])
def test_refuses_what_it_cannot_reproduce(changes, key):
    from megatron_patch.models import family_for

    config = {**GPT_OSS_20B, **changes}
    with pytest.raises(ValueError, match=re.escape(key)):
        family_for(config).model_args(config)


def test_biased_experts_need_expert_tensor_parallel_size_one():
    from megatron_patch.models import check_layout, expert_tensor_parallel_size, family_for

    args = family_for(GPT_OSS_20B).model_args(GPT_OSS_20B)
    assert expert_tensor_parallel_size(args, 8) == 1
    check_layout(args, 201088 + 128, tp=8, pp=4, ep=8, etp=1)
    with pytest.raises(ValueError, match="expert tensor parallel size 1 only, not 8"):
        check_layout(args, 201088 + 128, tp=8, pp=4, ep=8)


def test_stacked_expert_transforms():
    """Hand-made: an [experts=2, in=2, out=4] x @ W tensor whose columns are gate 0, up 0,
    gate 1, up 1 becomes, per expert, Megatron's [gate; up] rows of [out, in]; and back."""
    import torch

    from megatron_patch.convert import engine
    from megatron_patch.models.weight_rules import STACKED_GATE_UP, Dims, Rule, bind

    w = torch.arange(16.0).reshape(2, 2, 4)  # expert e, input i, column c: 8e + 4i + c
    rules = (Rule("l.{layer}.e.{expert}.fc1", "h.{layer}.gate_up", STACKED_GATE_UP),)
    bindings = bind(rules, {}, num_layers=1, num_experts=2)
    assert [(b.megatron, b.hf, b.expert) for b in bindings] == [
        ("l.0.e.0.fc1", ("h.0.gate_up",), 0), ("l.0.e.1.fc1", ("h.0.gate_up",), 1)]
    dims = Dims(1, 1, 1, 1, 1, 1)
    out = dict(engine.hf_to_megatron(bindings, dims, {"h.0.gate_up": w}.__getitem__, {}))
    # Rows: gate 0 (columns 0), gate 1 (column 2), up 0 (column 1), up 1 (column 3).
    assert out["l.0.e.1.fc1"].tolist() == [[8, 12], [10, 14], [9, 13], [11, 15]]
    back = dict(engine.megatron_to_hf(bindings, dims, out.__getitem__, {"h.0.gate_up": (2, 2, 4)}))
    assert torch.equal(back["h.0.gate_up"], w)
    # An expert missing from the export is an error, not a smaller tensor.
    with pytest.raises(engine.ConversionError, match="left incomplete"):
        list(engine.megatron_to_hf(bindings[:1], dims, out.__getitem__))
    # Each stacked HF tensor is consumed once per expert; a rule consuming it again is refused.
    engine.check_names(bindings, source=["h.0.gate_up"], target=list(out),
                       direction="hf->megatron")
    twice = bindings + [engine.Binding("x", ("h.0.gate_up",), bindings[0].transform)]
    with pytest.raises(engine.ConversionError, match="more than one rule: h.0.gate_up"):
        engine.check_names(twice, source=["h.0.gate_up"], target=[*out, "x"],
                           direction="hf->megatron")


def _quantize_mxfp4(w):
    """The test's own MXFP4 quantiser, from the format (transformers/OpenAI's layout): an
    [experts, in, out] x @ W weight -> blocks [experts, out, in / 32, 16] (uint8, two E2M1
    codes per byte, the lower nibble first) and scales [experts, out, in / 32] (uint8,
    exponent + 127), each block's scale the power of two that brings its largest |value|
    to at most 6."""
    import torch

    magnitudes = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    experts, inputs, outputs = w.shape
    rows = w.transpose(1, 2).reshape(experts, outputs, inputs // 32, 32)
    exponent = torch.ceil(torch.log2(rows.abs().amax(-1).clamp_min(2.0 ** -100) / 6.0))
    scaled = rows / torch.exp2(exponent)[..., None]
    codes = (scaled.abs()[..., None] - magnitudes).abs().argmin(-1) + 8 * (scaled < 0)
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exponent + 127).to(torch.uint8)


def _mxfp4_parity(root: str) -> dict:
    """A tiny GPT-OSS whose expert weights are stored in MXFP4 as released checkpoints store
    them, against transformers' own dequantisation of that checkpoint (Mxfp4Config(dequantize=
    True), what transformers does on CPU)."""
    import torch
    import transformers
    from safetensors.torch import load_file, save_file
    from zoo.gpt_oss import gpt_oss

    hf_dir = os.path.join(root, "hf")
    # Every expert input a whole number of 32-value blocks.
    gpt_oss(seed=3, intermediate_size=64, num_hidden_layers=2)().save_pretrained(hf_dir)
    path = os.path.join(hf_dir, "model.safetensors")
    tensors = load_file(path)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        tensors[name + "_blocks"], tensors[name + "_scales"] = _quantize_mxfp4(tensors.pop(name))
    save_file(tensors, path, metadata={"format": "pt"})
    r = harness.dequantized_import(hf_dir, root, GPT_OSS_20B["quantization_config"],
                                   transformers.Mxfp4Config(dequantize=True))
    # The same dequantised expert weights as transformers', bit for bit.
    ours = r["model"].decoder.layers[1].mlp.experts.local_experts[3].linear_fc2.weight
    theirs = r["oracle"].model.layers[1].mlp.experts.down_proj[3].T
    return {"max_abs": r["max_abs"], "same_weights": torch.equal(ours, theirs),
            "quantized": sum(n.endswith("_blocks") for n in tensors),
            "config_quantized": r["config_quantized"]}


def test_mxfp4_checkpoint_imports_dequantised(tmp_path):
    (r,) = harness.run(_mxfp4_parity, 1, str(tmp_path))
    assert r["quantized"] == 4 and not r["config_quantized"] and r["same_weights"], r
    # fp32 on CPU, both sides multiply the same E2M1 values by the same powers of two.
    assert r["max_abs"] <= harness.LOGITS_ATOL, r

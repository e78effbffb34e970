"""Mixture-of-experts specifics: training and generation through the MoE layer (Mixtral) with the
experts split over EP=2, layout and config refusals, and the converter's expert accounting.
(Parity with transformers at every layout is in test_zoo.py, cases in zoo/moe.py.)"""

import os
import re

import harness
import pytest
from harness import train_losses


def _prepare_moe_models(root: str) -> None:
    """Mixtral (every layer MoE) and Qwen3-MoE (a dense first layer, q/k norms, routing without
    renormalisation), converted, and one token dataset for both."""
    import torch
    import transformers

    from megatron_patch import tiny
    from megatron_patch.convert.hf_megatron import hf_to_megatron

    shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=96, vocab_size=1000,
                 num_experts_per_tok=2, max_position_embeddings=256, router_aux_loss_coef=0.01)
    configs = {
        "mixtral": transformers.MixtralConfig(**shape, num_local_experts=4),
        "qwen3_moe": transformers.Qwen3MoeConfig(**shape, num_experts=4, head_dim=32,
                                                 moe_intermediate_size=48, mlp_only_layers=[0],
                                                 norm_topk_prob=False),
        # MLA with a low-rank query, sigmoid routing with its expert bias (which Megatron-Core
        # updates from the expert loads during training), groups, a shared expert.
        "deepseek_v3": transformers.DeepseekV3Config(
            **{k: v for k, v in shape.items() if k != "router_aux_loss_coef"},
            n_routed_experts=4, moe_intermediate_size=48, n_shared_experts=1, q_lora_rank=32,
            kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            n_group=2, topk_group=1, first_k_dense_replace=1),
        # Attention sinks, biases everywhere (router and experts too), the clamped SwiGLU,
        # sliding-window layers, YaRN; experts stacked in the checkpoint.
        "gpt_oss": transformers.GptOssConfig(
            **shape, num_local_experts=4, head_dim=16, sliding_window=8, swiglu_limit=1.0),
    }
    for name, config in configs.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
        hf_dir = os.path.join(root, name, "hf")
        model.save_pretrained(hf_dir)
        tiny.train_tokenizer(hf_dir)
        hf_to_megatron(hf_dir, os.path.join(root, name, "mcore"))
    harness.make_token_dataset(os.path.join(root, "tokens"))


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("moe_train"))
    harness.run(_prepare_moe_models, 1, root)
    return root


@pytest.fixture(scope="module")
def mixtral(moe_models) -> str:
    return os.path.join(moe_models, "mixtral")


def _ep_flags(ep: int) -> tuple:
    return ("--expert-model-parallel-size", str(ep))


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_moe_loss_goes_down_and_ep_does_not_change_it(moe_models, family):
    """DP=2 with all experts on each rank vs. DP=2 with the experts split over EP=2: routing is
    dropless, so each token meets the same experts and the curves agree (fp32 reduction order
    only, 1e-5 as in test_training). The load-balancing loss (router_aux_loss_coef 0.01) trains
    along in both. Qwen3-MoE's and DeepSeek-V3's dense first layers are data-parallel in both;
    DeepSeek-V3's expert bias follows the global expert loads in both; GPT-OSS's expert biases
    and attention sinks train."""
    ckpt, data = os.path.join(moe_models, family, "mcore"), os.path.join(moe_models, "tokens")
    dense = harness.run(train_losses, 2, ckpt, data, iters=12, lr=5e-3, extra=_ep_flags(1))[0]
    split = harness.run(train_losses, 2, ckpt, data, iters=12, lr=5e-3, extra=_ep_flags(2))[0]
    harness.report_learning(f"moe {family}", drop=split[0] - sum(split[-3:]) / 3)
    # Drop (first loss minus the mean of the last 3) on seeds 1, 2 and 7 (the default;
    # MEGATRON_PATCH_TEST_SEED, for another CPU's rounding), the 4 families: 1.18-1.54, worst
    # 1.175 (qwen3_moe, seed 7). Bar: 0.5 (0.43 of the worst; the former 1.0 was 0.85).
    assert sum(split[-3:]) / 3 < split[0] - 0.5, split
    diff = max(abs(a - b) for a, b in zip(dense, split, strict=True))
    assert diff <= harness.LOSS_ATOL, (diff, dense, split)


def test_moe_greedy_generation_equals_transformers(mixtral):
    """The static inference engine (KV cache, one new token per step) through the MoE layer."""
    (ours,) = harness.run(harness.megatron_greedy, 1, mixtral, 1)
    (theirs,) = harness.run(harness.hf_greedy, 1, mixtral)
    assert ours == theirs, (ours, theirs)


def test_launcher_starts_tp_x_pp_x_ep_cpu_processes(monkeypatch):
    import torch

    from megatron_patch import launch

    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    monkeypatch.delenv("GPUS_PER_NODE", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    extra = ["--expert-model-parallel-size", "2"]
    assert launch.expert_parallel_size(extra) == 2
    assert launch.expert_parallel_size(["--expert-model-parallel-size=4"]) == 4
    assert launch.expert_parallel_size([]) == 1
    assert "--nproc_per_node=4" in launch.torchrun_prefix("dsw", 2, 1, 2)


def _qwen2_moe_config(**changes) -> dict:
    config = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
              "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 1000,
              "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
              "shared_expert_intermediate_size": 80, "hidden_act": "silu"}
    return {**config, **changes}


def test_layout_refuses_experts_not_divisible_by_ep():
    from megatron_patch.models import check_layout, family_for

    config = _qwen2_moe_config(num_experts=6)
    args = family_for(config).model_args(config)
    check_layout(args, 1024, tp=2, pp=2, ep=2)
    with pytest.raises(ValueError, match="number of experts 6 is not divisible by expert "
                                         "parallel size 4"):
        check_layout(args, 1024, tp=1, pp=1, ep=4)


@pytest.mark.parametrize("key, value", [("decoder_sparse_step", 2), ("mlp_only_layers", [1]),
                                        ("use_sliding_window", True)])
def test_qwen2_moe_refuses_dense_layers_and_sliding_window(key, value):
    from megatron_patch.models import family_for

    config = _qwen2_moe_config(**{key: value})
    with pytest.raises(ValueError, match=re.escape(f"{key}={value!r} is not supported")):
        family_for(config).model_args(config)


def test_qwen2_moe_routing_follows_norm_topk_prob():
    from megatron_patch.models import family_for

    for norm, pre_softmax in ((False, True), (True, False)):
        config = _qwen2_moe_config(norm_topk_prob=norm)
        args = family_for(config).model_args(config)
        assert args.moe_router_pre_softmax is pre_softmax and args.moe_shared_expert_gate


def _convert_with(root: str, drop: str | None, config_changes: dict) -> str:
    """Convert a copy of the Mixtral checkpoint with one tensor dropped / config changed; the
    converter's error message, or '' if it converted."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from megatron_patch.convert.hf_megatron import hf_to_megatron

    hf_dir = os.path.join(root, f"hf_{drop}_{sorted(config_changes)}")
    shutil.copytree(os.path.join(root, "hf"), hf_dir)
    weights = os.path.join(hf_dir, "model.safetensors")
    tensors = load_file(weights)
    if drop:
        del tensors[drop]
    save_file(tensors, weights, metadata={"format": "pt"})
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump({**config, **config_changes}, f)
    try:
        hf_to_megatron(hf_dir, hf_dir + "_mcore")
    except ValueError as e:
        return str(e)
    return ""


def test_converter_accounts_for_every_expert(mixtral):
    """An expert missing from the checkpoint, or one the config does not count, is an error
    naming it (never a silently dropped or uninitialised expert)."""
    missing = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    (err,) = harness.run(_convert_with, 1, mixtral, missing, {})
    assert "missing from the source" in err and missing in err, err
    (err,) = harness.run(_convert_with, 1, mixtral, None, {"num_local_experts": 3})
    assert "no rule consumes" in err and "experts.3.w1.weight" in err, err


def test_bind_expands_every_expert_and_refuses_one_sided_placeholders():
    from megatron_patch.models.weight_rules import Rule, bind

    rule = Rule("l.{layer}.e.{expert}.w", "h.{layer}.x.{expert}.w")
    bound = bind((rule,), {}, num_layers=2, num_experts=3)
    assert [(b.megatron, b.hf) for b in bound] == [
        (f"l.{i}.e.{e}.w", (f"h.{i}.x.{e}.w",)) for i in range(2) for e in range(3)]
    with pytest.raises(ValueError, match="appear on one side only"):
        bind((Rule("l.{layer}.e.w", "h.{layer}.x.{expert}.w"),), {}, 2, 3)
    with pytest.raises(ValueError, match="has no experts"):
        bind((rule,), {}, 2, None)


def test_qwen2_moe_without_qkv_bias():
    from megatron_patch.models import family_for
    from megatron_patch.models.weight_rules import bind

    for bias in (True, False):
        config = _qwen2_moe_config(qkv_bias=bias)
        family = family_for(config)
        names = [b.megatron for b in bind(family.weights, config, 4, 4)]
        assert family.model_args(config).add_qkv_bias is bias
        assert ("decoder.layers.0.self_attention.linear_qkv.bias" in names) is bias


# Qwen3-MoE's state is Mixtral's kind; DeepSeek-V3 adds the router's expert bias, GPT-OSS
# biases on the router and experts and the attention sinks.
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_moe_resume_is_exact_at_the_same_ep_and_refused_at_another(moe_models, family,
                                                                    tmp_path):
    ckpt, data = os.path.join(moe_models, family, "mcore"), os.path.join(moe_models, "tokens")
    save = str(tmp_path / "run")
    straight = harness.run(train_losses, 2, ckpt, data, iters=8, extra=_ep_flags(2))[0]
    first = harness.run(train_losses, 2, ckpt, data, iters=8, save=save,
                        extra=_ep_flags(2) + ("--exit-interval", "4"))[0]
    second = harness.run(train_losses, 2, save, data, iters=8, extra=_ep_flags(2))[0]
    assert first + second == straight
    if family != "mixtral":
        return  # what follows does not depend on the family: checked once
    with pytest.raises(AssertionError, match="saved at --expert-model-parallel-size 2"):
        harness.run(train_losses, 2, save, data, iters=8, extra=_ep_flags(1))
    # Weights alone do reshard across EP.
    harness.run(train_losses, 2, save, data, iters=6, extra=_ep_flags(1) + ("--no-load-optim",))


QWEN3_MOE = {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64,
             "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 32, "intermediate_size": 96, "vocab_size": 1000, "num_experts": 4,
             "num_experts_per_tok": 2, "moe_intermediate_size": 48, "hidden_act": "silu",
             "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
             "use_sliding_window": False, "attention_bias": False}


@pytest.mark.parametrize("changes, pattern", [
    ({}, None),  # Qwen3-30B-A3B: every layer sparse
    ({"mlp_only_layers": [0, 2]}, (0, 1, 0, 1)),
    ({"decoder_sparse_step": 2}, (0, 1, 0, 1)),
    ({"decoder_sparse_step": 2, "mlp_only_layers": [3]}, (0, 1, 0, 0)),
])
def test_qwen3_moe_dense_layers_follow_transformers(changes, pattern):
    """Layer i is sparse iff i is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0
    (transformers' Qwen3MoeDecoderLayer); dense layers map the MLP, sparse ones the experts."""
    from megatron_patch.models import family_for
    from megatron_patch.models.weight_rules import bind

    config = {**QWEN3_MOE, **changes}
    family = family_for(config)
    args = family.model_args(config)
    assert args.moe_layer_freq == pattern and args.qk_layernorm
    assert args.moe_router_pre_softmax is False  # norm_topk_prob: softmax over the top-k
    names = {b.megatron for b in bind(family.weights, config, 4, 4)}
    for layer, sparse in enumerate(pattern or (1,) * 4):
        assert (f"decoder.layers.{layer}.mlp.router.weight" in names) == bool(sparse)
        assert (f"decoder.layers.{layer}.mlp.linear_fc1.weight" in names) != bool(sparse)


@pytest.mark.parametrize("key, value", [("use_sliding_window", True), ("attention_bias", True),
                                        ("num_experts", 0), ("hidden_act", "gelu")])
def test_qwen3_moe_refuses_what_it_cannot_reproduce(key, value):
    from megatron_patch.models import family_for

    config = {**QWEN3_MOE, key: value}
    with pytest.raises(ValueError, match=re.escape(f"{key}={value!r} is not supported")):
        family_for(config).model_args(config)


def test_qwen3_moe_reads_transformers_5_expert_count_alias():
    from megatron_patch.models import family_for

    config = {k: v for k, v in QWEN3_MOE.items() if k != "num_experts"}
    config["num_local_experts"] = 8
    args = family_for(config).model_args(config)
    assert args.num_moe_experts == 8 and args.moe_router_pre_softmax is False
    assert family_for({**QWEN3_MOE, "norm_topk_prob": False}).model_args(
        {**QWEN3_MOE, "norm_topk_prob": False}).moe_router_pre_softmax is True


DEEPSEEK_V3 = {"architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 64,
               "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
               "intermediate_size": 96, "moe_intermediate_size": 24, "vocab_size": 1000,
               "n_routed_experts": 8, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
               "n_shared_experts": 1, "first_k_dense_replace": 3, "q_lora_rank": 32,
               "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
               "v_head_dim": 16, "hidden_act": "silu", "topk_method": "noaux_tc",
               "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
               "num_nextn_predict_layers": 1, "max_position_embeddings": 163840,
               # DeepSeek-V3's released (transformers 4.x) rope keys.
               "rope_theta": 10000, "rope_scaling": {
                   "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                   "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}}


def test_deepseek_v3_released_config():
    """DeepSeek-V3's shapes of routing and YaRN, read into Megatron-Core's MLA/MoE settings."""
    from megatron_patch.models import family_for

    args = family_for(DEEPSEEK_V3).model_args(DEEPSEEK_V3)
    mla = dict(args.mla)
    assert (mla["rope_type"], mla["rotary_scaling_factor"], mla["mscale_all_dim"]) == (
        "yarn", 40.0, 1.0)
    assert mla["q_lora_rank"] == 32 and mla["original_max_position_embeddings"] == 4096
    assert args.moe_layer_freq == (0, 0, 0, 1)
    assert (args.moe_router_score_function, args.moe_router_enable_expert_bias,
            args.moe_router_num_groups, args.moe_router_group_topk,
            args.moe_router_topk_scaling_factor) == ("sigmoid", True, 8, 4, 2.5)
    assert args.moe_shared_expert_intermediate_size == 24


@pytest.mark.parametrize("changes, message", [
    # DeepSeek-V2 (236B): groups scored by their best expert, top-6 within 3 groups.
    ({"architectures": ["DeepseekV2ForCausalLM"], "topk_method": "group_limited_greedy",
      "scoring_func": "softmax", "num_experts_per_tok": 6, "topk_group": 3},
     "num_experts_per_tok // topk_group == 1"),
    ({"rope_interleave": False}, "rope_interleave=False"),
    ({"norm_topk_prob": False}, "norm_topk_prob=False"),
    ({"scoring_func": "softmax"}, "scoring_func='softmax'"),
    ({"moe_layer_freq": 2}, "moe_layer_freq=2"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type='linear'"),
])
def test_deepseek_refuses_what_it_cannot_reproduce(changes, message):
    from megatron_patch.models import family_for

    config = {**DEEPSEEK_V3, **changes}
    with pytest.raises(ValueError, match=re.escape(message)):
        family_for(config).model_args(config)


def _fp8_parity(root: str) -> dict:
    """A tiny DeepSeek-V3 quantised as DeepSeek-V3's checkpoints are (float8_e4m3fn linears,
    float32 scale_inv per [16, 16] block, router/norms/embeddings unquantised), against
    transformers' own dequantisation of that checkpoint."""
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=96, moe_intermediate_size=32, vocab_size=1000, n_routed_experts=4,
        num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1, q_lora_rank=32,
        kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
        first_k_dense_replace=1)  # every projection a whole number of 16 x 16 blocks
    hf_dir = os.path.join(root, "hf")
    transformers.DeepseekV3ForCausalLM(config).save_pretrained(hf_dir)
    path = os.path.join(hf_dir, "model.safetensors")
    tensors, block = load_file(path), 16
    for name in [n for n, t in tensors.items() if t.dim() == 2 and "proj" in n]:
        w = tensors[name]
        blocks = w.reshape(w.shape[0] // block, block, w.shape[1] // block, block)
        scale = blocks.abs().amax(dim=(1, 3)) / 448.0  # e4m3's largest normal value
        expanded = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)
        tensors[name] = (w / expanded).to(torch.float8_e4m3fn)
        tensors[name + "_scale_inv"] = scale
    save_file(tensors, path, metadata={"format": "pt"})
    r = harness.dequantized_import(
        hf_dir, root, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                       "weight_block_size": [block, block]},
        transformers.FineGrainedFP8Config(dequantize=True))
    return {"max_abs": r["max_abs"], "config_quantized": r["config_quantized"],
            "quantized": sum(t.dtype == torch.float8_e4m3fn for t in tensors.values())}


def test_fp8_deepseek_checkpoint_imports_dequantised(tmp_path):
    (r,) = harness.run(_fp8_parity, 1, str(tmp_path))
    assert r["quantized"] > 10 and not r["config_quantized"], r
    # fp32 on CPU, both sides multiply the same fp8 values by the same scales.
    assert r["max_abs"] <= harness.LOGITS_ATOL, r


def _bf16_v3_with_fp32_bias(hf_src: str, root: str) -> dict:
    """In a worker: the tiny DeepSeek-V3 saved as released checkpoints are (bf16 weights, fp32
    e_score_correction_bias), converted without params_dtype and exported again."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from megatron_patch import checkpoint, parallel
    from megatron_patch.convert.hf_megatron import hf_to_megatron, megatron_to_hf
    from megatron_patch.models import from_checkpoint

    hf, mcore, back = (os.path.join(root, d) for d in ("hf", "mcore", "back"))
    shutil.copytree(hf_src, hf)
    (weights,) = [f for f in os.listdir(hf) if f.endswith(".safetensors")]
    gen = torch.Generator().manual_seed(0)
    # A bias with all of fp32's mantissa bits (transformers initialises it to zeros).
    tensors = {k: torch.randn(v.shape, generator=gen) * 0.1
               if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16)
               for k, v in load_file(os.path.join(hf, weights)).items()}
    save_file(tensors, os.path.join(hf, weights), metadata={"format": "pt"})
    with open(os.path.join(hf, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(hf, "config.json"), "w") as f:
        json.dump({**config, "dtype": "bfloat16"}, f)
    hf_to_megatron(hf, mcore)
    parallel.initialize(1, 1)
    model, _ = from_checkpoint(mcore)
    biases = {n: b for n, b in model.named_buffers() if n.endswith("router.expert_bias")}
    megatron_to_hf(mcore, back)
    again = load_file(os.path.join(back, "model.safetensors"))
    hf_biases = [tensors[k] for k in sorted(tensors) if k.endswith("e_score_correction_bias")]
    return {"dtype": checkpoint.read_meta(mcore).dtype,
            "biases": [str(b.dtype) for b in biases.values()],
            "bias_exact": all(torch.equal(b, h) for b, h in zip(
                [biases[n] for n in sorted(biases, key=lambda n: int(n.split(".")[2]))],
                hf_biases, strict=True)),
            "round_trip": sorted(k for k in tensors if tensors[k].dtype != again[k].dtype
                                 or not torch.equal(tensors[k], again[k]))}


def test_bf16_deepseek_v3_keeps_its_fp32_expert_bias(moe_models, tmp_path):
    """Released DeepSeek-V3 checkpoints hold bf16 weights and an fp32 e_score_correction_bias;
    Megatron-Core keeps the router's expert bias in fp32. The conversion takes bf16 from the
    weights, keeps the bias fp32 (rounding it would change which experts are chosen), and the
    round trip gives every tensor back bit for bit, dtypes included."""
    (r,) = harness.run(_bf16_v3_with_fp32_bias, 1, os.path.join(moe_models, "deepseek_v3", "hf"),
                       str(tmp_path))
    assert r["dtype"] == "bfloat16" and set(r["biases"]) == {"torch.float32"}, r
    assert r["bias_exact"] and r["round_trip"] == [], r


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3"])
def test_trains_at_tp2_sp_with_the_tp1_curve(moe_models, tmp_path, family):
    """At TP=2 + SP the attention is split and each rank meets its own slice of the sequence;
    the loss curve is TP=1's (fp32 reduction order only, 1e-5 as in test_training). Without the
    load-balancing loss, which Megatron-Core computes per sequence slice under SP (for Mixtral
    too).
    - GPT-OSS's biased experts run at expert tensor parallel size 1 (models.
      expert_tensor_parallel_size): each rank holds every expert whole; expert gradients are
      summed over the TP ranks once, and both ranks clip by the same norm.
    - DeepSeek-V3's multi-latent attention shares one rotary key part across heads, whose
      gradient megatron-core 0.16 leaves per rank (models/sdpa_attention.SharedRopeKeyGrad)."""
    ckpt = harness.without_aux_loss({family: os.path.join(moe_models, family)},
                                    str(tmp_path))[family]
    data = os.path.join(moe_models, "tokens")
    one = harness.run(train_losses, 1, ckpt, data, iters=8, lr=5e-3)[0]
    two = harness.run(train_losses, 2, ckpt, data, iters=8, lr=5e-3, tp=2, sp=True)[0]
    harness.report_learning(f"moe tp2 {family}", drop=two[0] - sum(two[-3:]) / 3)
    # Drop (first loss minus the mean of the last 3) on seeds 1, 2 and 7 (the default;
    # MEGATRON_PATCH_TEST_SEED, for another CPU's rounding), both families: 0.62-0.88, worst
    # 0.618 (deepseek_v3, seed 2). Bar: 0.25 (0.40 of the worst; the former 0.5 was 0.81).
    assert sum(two[-3:]) / 3 < two[0] - 0.25, two
    diff = max(abs(a - b) for a, b in zip(one, two, strict=True))
    assert diff <= 1e-5, (diff, one, two)

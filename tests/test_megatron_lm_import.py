"""Megatron-LM checkpoints as inputs: legacy per-rank files and torch_dist (issue 18).

The fixtures are written here the way Megatron-LM writes them, following
NVIDIA/Megatron-LM megatron/training/checkpointing.py at commit
0032978f335e0b72490147137948f9a45269f9d7: `get_checkpoint_name` (iter_0000100/mp_rank_TT for
PP = 1, mp_rank_TT_PPP otherwise, model_optim_rng.pt), `generate_state_dict` (`args`,
`checkpoint_version` 3.0, `iteration`, `model`, `optimizer`, `opt_param_scheduler`, `rng_state`)
and the tracker file latest_checkpointed_iteration.txt; torch_dist ones with Megatron-Core's
dist_checkpointing.save of {model: sharded state, args, iteration, checkpoint_version}, which
puts everything but the tensors in common.pt.

The weights are a tiny HF model's, put into Megatron-Core's layout by this file's own code
(`_megatron_state`, `_shard`), not by the code under test; the reference is transformers on the
original HF model. Logits are compared in fp32 within 1e-4 (the suite's norm for fp32 on CPU:
the same function, summed in another order); round trips are bit-exact.
"""

import argparse
import json
import os
import shutil

import harness
import pytest

TP_PP = [(1, 1), (2, 2)]
BATCH, SEQ, VOCAB, PADDED = 2, 16, 1000, 1024


def _llama(hf_dir: str):
    from megatron_patch import tiny

    tiny.make_hf_model(hf_dir, "llama2")  # GQA (4 heads, 2 groups), untied, vocab 1000


def _mixtral(hf_dir: str):
    """Llama-style attention, every MLP 4 SwiGLU experts behind a top-2 router."""
    import torch
    import transformers

    from megatron_patch import tiny

    config = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(hf_dir)
    tiny.train_tokenizer(hf_dir)


def _gpt(hf_dir: str, multi_query: bool = False):
    """GPT-style: LayerNorm, biases everywhere (random), learned positions, tied, GELU (tanh,
    as Megatron-Core's fused bias-GELU computes it); multi-head, or multi-query."""
    import torch
    import transformers

    from megatron_patch import tiny

    config = transformers.GPTBigCodeConfig(
        vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=256, multi_query=multi_query,
        activation_function="gelu_pytorch_tanh", resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.GPTBigCodeForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.uniform_(-0.1, 0.1)
            elif name.endswith("bias"):
                p.uniform_(-0.1, 0.1)
            # GELU inputs of order 1, where its exact and tanh forms differ, and logits of
            # order 10 (the tied embedding), so that the difference shows.
            if "c_fc" in name or "wte" in name:
                p.mul_(20)
    model.save_pretrained(hf_dir)
    tiny.train_tokenizer(hf_dir)


def _megatron_state(kind: str, hf: dict, te_names: bool) -> dict:
    """HF tensors -> the unsharded Megatron-Core state dict (local-spec names, or Transformer
    Engine's fused norm names), vocabulary padded to PADDED with random rows."""
    import torch

    gen = torch.Generator().manual_seed(3)

    def pad(t):
        return torch.cat([t, torch.randn(PADDED - t.shape[0], t.shape[1], generator=gen)])

    norm_in = "self_attention.linear_qkv.layer_norm_" if te_names else "input_layernorm."
    # (Transformer Engine's MoE layer keeps a separate pre_mlp_layernorm.)
    norm_mlp = ("mlp.linear_fc1.layer_norm_" if te_names and kind != "mixtral"
                else "pre_mlp_layernorm.")
    out = {}
    if kind in ("llama", "mixtral"):
        heads, groups, d = 4, 2, 16
        out["embedding.word_embeddings.weight"] = pad(hf["model.embed_tokens.weight"])
        for i in range(4):
            h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
            q = hf[h + "self_attn.q_proj.weight"].reshape(groups, heads // groups * d, -1)
            k = hf[h + "self_attn.k_proj.weight"].reshape(groups, d, -1)
            v = hf[h + "self_attn.v_proj.weight"].reshape(groups, d, -1)
            out[m + norm_in + "weight"] = hf[h + "input_layernorm.weight"]
            out[m + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], 1).reshape(-1, 64)
            out[m + "self_attention.linear_proj.weight"] = hf[h + "self_attn.o_proj.weight"]
            out[m + norm_mlp + "weight"] = hf[h + "post_attention_layernorm.weight"]
            if kind == "mixtral":  # the router, then each expert's [w1; w3] and w2
                moe = h + "block_sparse_moe."
                out[m + "mlp.router.weight"] = hf[moe + "gate.weight"]
                for g in range(4):
                    expert = f"{m}mlp.experts.local_experts.{g}."
                    out[expert + "linear_fc1.weight"] = torch.cat(
                        [hf[f"{moe}experts.{g}.w1.weight"], hf[f"{moe}experts.{g}.w3.weight"]])
                    out[expert + "linear_fc2.weight"] = hf[f"{moe}experts.{g}.w2.weight"]
                continue
            out[m + "mlp.linear_fc1.weight"] = torch.cat([hf[h + "mlp.gate_proj.weight"],
                                                          hf[h + "mlp.up_proj.weight"]])
            out[m + "mlp.linear_fc2.weight"] = hf[h + "mlp.down_proj.weight"]
            if te_names:  # Transformer Engine's extra states, as older TE saves them
                import io

                out[m + "self_attention.linear_qkv._extra_state"] = io.BytesIO(b"")
                out[m + "mlp.linear_fc2._extra_state"] = None
        out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
        out["output_layer.weight"] = pad(hf["lm_head.weight"])
        return out
    out["embedding.word_embeddings.weight"] = pad(hf["transformer.wte.weight"])
    out["embedding.position_embeddings.weight"] = hf["transformer.wpe.weight"]
    for i in range(4):
        h, m = f"transformer.h.{i}.", f"decoder.layers.{i}."
        for megatron, name in ((norm_in, "ln_1."), (norm_mlp, "ln_2.")):
            out[m + megatron + "weight"] = hf[h + name + "weight"]
            out[m + megatron + "bias"] = hf[h + name + "bias"]
        # c_attn is [q, k, v] per head (multi-head), or all q heads then k and v (multi-query):
        # Megatron's per-group order already.
        for megatron, name in (("self_attention.linear_qkv.", "attn.c_attn."),
                               ("self_attention.linear_proj.", "attn.c_proj."),
                               ("mlp.linear_fc1.", "mlp.c_fc."),
                               ("mlp.linear_fc2.", "mlp.c_proj.")):
            out[m + megatron + "weight"] = hf[h + name + "weight"]
            out[m + megatron + "bias"] = hf[h + name + "bias"]
    out["decoder.final_layernorm.weight"] = hf["transformer.ln_f.weight"]
    out["decoder.final_layernorm.bias"] = hf["transformer.ln_f.bias"]
    return out


def _shard(state: dict, tp: int, pp: int, gated: bool, tied: bool, ep: int = 1,
           experts: int = 0) -> dict:
    """(tp rank, pp rank, expert rank) -> that rank's state dict, as Megatron-Core splits the
    model: rows of the embedding, output layer, linear_qkv (whole groups) and linear_fc1 (gate
    and up halves each), columns of linear_proj and linear_fc2; layers split evenly over
    stages and numbered from 0 in each; the tied output layer copied onto the last stage;
    `experts` split evenly over expert ranks, numbered from 0 in each, in Transformer Engine's
    grouped spelling (linear_fc1.weight0) on odd expert ranks."""
    import re

    import torch

    layers = 4 // pp
    ranks = {}
    for p, t, e in ((p, t, e) for p in range(pp) for t in range(tp) for e in range(ep)):
        rank = {}
        for name, value in state.items():
            expert = re.fullmatch(r"(.*experts\.)local_experts\.(\d+)\.(.*)", name)
            if expert:
                g, local = divmod(int(expert.group(2)), experts // ep)
                if g != e:
                    continue
                name = (f"{expert.group(1)}{expert.group(3)}{local}" if e % 2 else
                        f"{expert.group(1)}local_experts.{local}.{expert.group(3)}")
            m = re.fullmatch(r"decoder\.layers\.(\d+)\.(.*)", name)
            if m:
                i = int(m.group(1))
                if i // layers != p:
                    continue
                name = f"decoder.layers.{i % layers}.{m.group(2)}"
            elif name.startswith("embedding.") and p != 0:
                continue
            elif name.startswith(("decoder.final", "output_layer")) and p != pp - 1:
                continue
            if not isinstance(value, torch.Tensor) or name.endswith("_extra_state"):
                rank[name] = value
            elif re.search(r"linear_fc1\.weight\d*$", name) and gated:
                gate, up = value.chunk(2)
                rank[name] = torch.cat([gate.chunk(tp)[t], up.chunk(tp)[t]]).clone()
            elif re.search(r"(word_embeddings|output_layer|linear_qkv|linear_fc1)"
                           r"\.(weight|bias)$", name):
                rank[name] = value.chunk(tp)[t].clone()
            elif re.search(r"(linear_proj|linear_fc2)\.weight\d*$", name):
                rank[name] = value.chunk(tp, dim=1)[t].clone()
            else:
                rank[name] = value.clone()
        if tied and pp > 1 and p == pp - 1:
            rank["output_layer.weight"] = state["embedding.word_embeddings.weight"].chunk(
                tp)[t].clone()
        ranks[(t, p, e)] = rank
    return ranks


def _legacy_model_names(rank: dict) -> dict:
    """A Megatron-Core rank state dict as Megatron-LM's legacy GPTModel saves the same tensors
    (megatron/legacy/model: nested language_model / embedding / encoder dicts,
    word_embeddings_for_head for the last stage's copy of a tied embedding)."""
    import re

    layer_names = (("input_layernorm.", "input_norm."),
                   ("self_attention.linear_qkv.", "self_attention.query_key_value."),
                   ("self_attention.linear_proj.", "self_attention.dense."),
                   ("pre_mlp_layernorm.", "post_attention_norm."),
                   ("mlp.linear_fc1.", "mlp.dense_h_to_4h."),
                   ("mlp.linear_fc2.", "mlp.dense_4h_to_h."))
    language_model: dict = {}
    out = {"language_model": language_model}
    for name, value in rank.items():
        if name.startswith("embedding."):
            what, param = name.split(".")[1:]
            language_model.setdefault("embedding", {}).setdefault(what, {})[param] = value
        elif m := re.fullmatch(r"decoder\.layers\.(\d+)\.(.*)", name):
            rest = m.group(2)
            for new, old in layer_names:
                rest = rest.replace(new, old)
            language_model.setdefault("encoder", {})[f"layers.{m.group(1)}.{rest}"] = value
        elif name.startswith("decoder.final_layernorm."):
            language_model.setdefault("encoder", {})[
                name.replace("decoder.final_layernorm.", "final_norm.")] = value
        else:
            assert name == "output_layer.weight", name
            out["word_embeddings_for_head"] = {"weight": value}
    return out


def _args(kind: str, tp: int, pp: int, ckpt_format: str = "torch") -> argparse.Namespace:
    """The model arguments Megatron-LM's parser and validate_args leave in `args`."""
    import torch
    from megatron.core.transformer.enums import AttnBackend

    common = dict(num_layers=4, hidden_size=64, num_attention_heads=4, kv_channels=16,
                  max_position_embeddings=256, seq_length=256, norm_epsilon=1e-5,
                  padded_vocab_size=PADDED, make_vocab_size_divisible_by=128,
                  tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                  expert_model_parallel_size=1, params_dtype=torch.float32, bf16=False,
                  fp16=False, apply_layernorm_1p=False, num_experts=None, squared_relu=False,
                  openai_gelu=False, bias_gelu_fusion=True, rotary_percent=1.0,
                  rotary_interleaved=False, use_legacy_models=False, qk_layernorm=False,
                  add_qkv_bias=False, ckpt_format=ckpt_format,
                  attention_backend=AttnBackend.auto, tokenizer_type="HuggingFaceTokenizer",
                  iteration=100)
    if kind == "mixtral":
        moe = dict(num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=96,
                   moe_router_pre_softmax=False, moe_grouped_gemm=True, moe_aux_loss_coeff=0.0,
                   moe_layer_freq=1, expert_model_parallel_size=2,
                   expert_tensor_parallel_size=tp)
        common = {**common, **moe}
    if kind in ("llama", "mixtral"):
        # (Mixtral's rope_theta is 1e6: --rotary-base 1000000.)
        return argparse.Namespace(**common, ffn_hidden_size=96, group_query_attention=True,
                                  num_query_groups=2, position_embedding_type="rope",
                                  rotary_base=10000 if kind == "llama" else 1000000,
                                  normalization="RMSNorm", swiglu=True,
                                  add_bias_linear=False, untie_embeddings_and_output_weights=True)
    return argparse.Namespace(**common, ffn_hidden_size=256, group_query_attention=False,
                              num_query_groups=1, position_embedding_type="learned_absolute",
                              rotary_base=10000, normalization="LayerNorm", swiglu=False,
                              add_bias_linear=True, untie_embeddings_and_output_weights=False)


def _write_legacy(root: str, args: argparse.Namespace, ranks: dict) -> None:
    import random

    import numpy as np
    import torch

    iteration = 100
    for (t, p, e), model in ranks.items():
        name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if args.pipeline_model_parallel_size > 1
                                     else "") + (
            f"_{e:03d}" if args.expert_model_parallel_size > 1 else "")
        path = os.path.join(root, f"iter_{iteration:07d}", name, "model_optim_rng.pt")
        os.makedirs(os.path.dirname(path))
        tensors = [v for v in model.values() if isinstance(v, torch.Tensor)]
        state = {
            "args": args, "checkpoint_version": 3.0, "iteration": iteration, "model": model,
            "optimizer": {"optimizer": {"state": {i: {"exp_avg": torch.zeros_like(v)}
                                                  for i, v in enumerate(tensors)},
                                        "param_groups": [{"lr": 1e-4, "params": list(
                                            range(len(tensors)))}]},
                          "fp32_from_fp16_params": []},
            "opt_param_scheduler": {"max_lr": 1e-4, "num_steps": 100},
            "rng_state": [{"random_rng_state": random.getstate(),
                           "np_rng_state": np.random.get_state(),
                           "torch_rng_state": torch.get_rng_state(),
                           "rng_tracker_states": {}}],
            "num_floating_point_operations_so_far": 0,
        }
        torch.save(state, path)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))


def _write_torch_dist(root: str, kind: str, args: argparse.Namespace, state: dict) -> None:
    """Megatron-Core's own GPTModel (its local spec) holding `state`, saved as Megatron-LM saves
    a torch_dist checkpoint."""
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_patch import cpu_mode, parallel

    parallel.initialize(1, 1)
    llama = kind == "llama"
    norm = "RMSNorm" if llama else "LayerNorm"
    config = TransformerConfig(
        num_layers=4, hidden_size=64, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=4, num_query_groups=args.num_query_groups, kv_channels=16,
        normalization=norm, layernorm_epsilon=1e-5, gated_linear_unit=llama,
        activation_func=torch.nn.functional.silu if llama else torch.nn.functional.gelu,
        add_bias_linear=not llama, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, params_dtype=torch.float32,
        use_cpu_initialization=True)
    model = GPTModel(config, get_gpt_layer_local_spec(normalization=norm), PADDED, 256,
                     share_embeddings_and_output_weights=not llama,
                     position_embedding_type="rope" if llama else "learned_absolute")
    model.load_state_dict(state, strict=False)
    loaded = {n: t for n, t in model.state_dict().items() if not n.endswith("_extra_state")}
    assert set(loaded) == set(state), set(loaded) ^ set(state)
    assert all(torch.equal(loaded[n], v) for n, v in state.items()), "fixture did not load"
    iter_dir = os.path.join(root, "iter_0000007")
    os.makedirs(iter_dir)
    # megatron-core otherwise collects the write results through a spawned multiprocessing
    # Manager, which this forked worker's os._exit would leave running, orphaned (issue 27);
    # the files written are the same.
    cpu_mode.enable_in_process_checkpoint_queue()
    dist_checkpointing.save({"model": model.sharded_state_dict(), "args": args,
                             "checkpoint_version": 3.0, "iteration": 7}, iter_dir)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("7")


def _make_fixtures(root: str) -> None:
    """In a worker: the HF models, their reference logits, and their Megatron-LM checkpoints."""
    import torch
    import transformers
    from safetensors.torch import load_file

    kinds = (("llama", _llama), ("gpt", _gpt),
             ("gpt_mqa", lambda hf_dir: _gpt(hf_dir, multi_query=True)), ("mixtral", _mixtral))
    for kind, make in kinds:
        hf_dir = os.path.join(root, kind, "hf")
        make(hf_dir)
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        # Ids the tokenizer has (486 of them), so that exports cut to its length run too.
        tokens = torch.randint(0, 480, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = model(input_ids=tokens, labels=tokens)
        torch.save({"tokens": tokens, "logits": ref.logits, "loss": ref.loss.item()},
                   os.path.join(root, kind, "ref.pt"))
        # The saved tensors (transformers 5 fuses a Mixtral's experts in memory, not on disk).
        hf = load_file(os.path.join(hf_dir, "model.safetensors"))
        if kind == "mixtral":  # TP=2 x EP=2, experts half in each spelling
            ranks = _shard(_megatron_state(kind, hf, True), 2, 1, gated=True, tied=False, ep=2,
                           experts=4)
            _write_legacy(os.path.join(root, kind, "legacy_tp2pp1ep2"), _args(kind, 2, 1), ranks)
            continue
        if kind == "gpt_mqa":  # one KV group: Megatron-LM cannot split it over TP ranks
            ranks = _shard(_megatron_state("gpt", hf, False), 1, 1, gated=False, tied=True)
            args = _args("gpt", 1, 1)
            args.group_query_attention = True
            _write_legacy(os.path.join(root, kind, "legacy_tp1pp1"), args, ranks)
            args = _args("gpt", 1, 1, "torch_dist")
            args.group_query_attention = True
            _write_torch_dist(os.path.join(root, kind, "torch_dist"), "gpt", args,
                              _megatron_state("gpt", hf, False))
            continue
        for tp, pp in TP_PP:
            te_names = kind == "llama" and tp > 1  # both spellings of the fused norms
            state = _megatron_state(kind, hf, te_names)
            ranks = _shard(state, tp, pp, gated=kind == "llama", tied=kind == "gpt")
            _write_legacy(os.path.join(root, kind, f"legacy_tp{tp}pp{pp}"), _args(kind, tp, pp),
                          ranks)
            if kind == "gpt" and tp > 1:
                args = _args(kind, tp, pp)
                args.use_legacy_models = True
                _write_legacy(os.path.join(root, kind, "legacy_model_tp2pp2"), args,
                              {r: _legacy_model_names(state) for r, state in ranks.items()})
        if kind == "llama":
            _write_torch_dist(os.path.join(root, kind, "torch_dist"), kind,
                              _args(kind, 1, 1, "torch_dist"),
                              _megatron_state(kind, hf, te_names=False))


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("megatron_lm"))
    harness.run(_make_fixtures, 1, root)
    return root


def _logits_error(hf_dir: str, ref_path: str, vocab: int) -> float:
    import torch
    import transformers

    ref = torch.load(ref_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=ref["tokens"]).logits
    return (logits[..., :vocab] - ref["logits"][..., :vocab]).abs().max().item()


def _export_cases(root: str, out: str) -> dict:
    """Each checkpoint exported directly, and imported then exported: logits errors against
    transformers on the original model, and the tensors the two exports disagree on."""
    from transformers import AutoTokenizer

    from megatron_patch.convert import hf_megatron, megatron_lm

    tokenizer = len(AutoTokenizer.from_pretrained(os.path.join(root, "llama", "hf")))
    cases = [  # (kind, checkpoint, options, vocabulary the export has)
        ("llama", "legacy_tp1pp1", {"tokenizer_dir": "hf"}, tokenizer),
        ("llama", "legacy_tp2pp2", {"hf_config_path": "hf"}, VOCAB),
        ("llama", "torch_dist", {"hf_config_path": "hf/config.json", "tokenizer_dir": "hf"},
         VOCAB),
        ("gpt", "legacy_tp1pp1", {}, PADDED),
        ("gpt", "legacy_tp2pp2", {"tokenizer_dir": "hf"}, tokenizer),
        ("gpt", "legacy_model_tp2pp2", {"hf_config_path": "hf"}, VOCAB),
        ("gpt_mqa", "legacy_tp1pp1", {"hf_config_path": "hf"}, VOCAB),
        ("gpt_mqa", "torch_dist", {}, PADDED),
        ("mixtral", "legacy_tp2pp1ep2", {"hf_config_path": "hf"}, VOCAB),
    ]
    report = {}
    for kind, name, options, vocab in cases:
        base = os.path.join(root, kind)
        options = {k: os.path.join(base, v) for k, v in options.items()}
        direct, again = (os.path.join(out, f"{kind}_{name}_{s}") for s in ("hf", "hf2"))
        # Laid out as test_llama_parity's model directories: mcore/ and reference.pt.
        imported = os.path.join(out, "parity", f"{kind}_{name}", "mcore")
        os.makedirs(os.path.dirname(imported))
        shutil.copy(os.path.join(base, "ref.pt"),
                    os.path.join(os.path.dirname(imported), "reference.pt"))
        megatron_lm.export_to_hf(os.path.join(base, name), direct, **options)
        megatron_lm.import_megatron(os.path.join(base, name), imported, **options)
        hf_megatron.megatron_to_hf(imported, again)
        with open(os.path.join(direct, "config.json")) as f:
            config = json.load(f)
        report[f"{kind}/{name}"] = {
            "logits_error": _logits_error(direct, os.path.join(base, "ref.pt"),
                                          min(vocab, VOCAB)),
            "vocab_size": config["vocab_size"], "expected_vocab_size": vocab,
            "architecture": config["architectures"][0],
            "differ": harness.differing_tensors(direct, again),
            "tokenizer": os.path.isfile(os.path.join(direct, "tokenizer.json")),
        }
    return report


def test_megatron_lm_checkpoints_export_like_the_original(fixtures, tmp_path):
    """Llama-style and GPT-style models in legacy files at TP=1 PP=1 and TP=2 PP=2 (TE and
    local norm names, tied head on the last stage; the GPT also with Megatron-LM's legacy
    model names, and multi-query), a Mixtral at TP=2 EP=2, and in torch_dist checkpoints
    (Llama, multi-query GPT)
    export to HF models whose logits are transformers' on the original weights (fp32, within
    1e-4); import then export gives the direct export's tensors bit for bit."""
    (report,) = harness.run(_export_cases, 1, fixtures, str(tmp_path))
    assert len(report) == 9, report
    for case, r in report.items():
        assert r["logits_error"] < harness.LOGITS_ATOL, (case, r)
        assert r["differ"] == [], (case, r)
        assert r["vocab_size"] == r["expected_vocab_size"], (case, r)
    assert report["llama/legacy_tp1pp1"]["vocab_size"] < VOCAB  # the tokenizer's length
    assert report["llama/legacy_tp2pp2"]["vocab_size"] == VOCAB  # --hf-config's
    assert report["gpt/legacy_tp1pp1"]["vocab_size"] == PADDED  # no flags: nothing dropped
    assert report["llama/torch_dist"]["architecture"] == "LlamaForCausalLM"
    assert report["gpt/legacy_tp2pp2"]["architecture"] == "GPTBigCodeForCausalLM"
    assert report["gpt/legacy_tp2pp2"]["tokenizer"]

    # The imported checkpoints load as any other, here at TP=2 PP=2 with sequence parallelism
    # (the parity tests' check: harness.LOGITS_ATOL on logits, LOSS_ATOL on the loss).
    parity = {case: os.path.join(tmp_path, "parity", case.replace("/", "_"))
              for case, r in report.items() if r["vocab_size"] == VOCAB}
    assert len(parity) == 5, parity
    reports = harness.run(harness.checkpoint_parity, 4, parity, 2, 2, True, None)
    merged = {k: v for r in reports for k, v in r.items()}
    assert set(merged) == set(parity), merged
    for case, r in merged.items():
        assert r["max_abs"] <= harness.LOGITS_ATOL, (case, r)
        assert r["loss_diff"] <= harness.LOSS_ATOL, (case, r)


def test_megatron_lm_export_matches_the_original_tensors(fixtures, tmp_path):
    """With the original config.json, the exported tensors are the original ones bit for bit
    (the merge of TP/PP ranks and the q/k/v and gate/up layouts move whole rows only)."""

    def run(root, out):
        from megatron_patch.convert import megatron_lm

        base = os.path.join(root, "llama")
        megatron_lm.export_to_hf(os.path.join(base, "legacy_tp2pp2"), out,
                                 hf_config_path=os.path.join(base, "hf"))
        return harness.differing_tensors(os.path.join(base, "hf"), out)

    (differ,) = harness.run(run, 1, fixtures, str(tmp_path / "out"))
    assert differ == []


def _copy(fixtures: str, kind: str, name: str, tmp_path) -> str:
    target = str(tmp_path / f"{kind}_{name}")
    shutil.copytree(os.path.join(fixtures, kind, name), target)
    return target


def _error(fn, *args, **kwargs) -> str:
    try:
        fn(*args, **kwargs)
    except (ValueError, FileNotFoundError) as e:
        return f"{type(e).__name__}: {e}"
    raise AssertionError(f"{fn.__name__} did not fail")


class _RunsCode:
    """A pickle payload that writes a file if it is ever unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _bad_inputs(fixtures: str, tmp: str) -> dict:
    import pathlib

    import torch

    from megatron_patch.convert import megatron_lm

    tmp_path = pathlib.Path(tmp)
    out = {}
    export = megatron_lm.export_to_hf

    # A rank file with an object that would run code: refused by its class, never executed.
    ckpt = _copy(fixtures, "llama", "legacy_tp1pp1", tmp_path)
    path = os.path.join(ckpt, "iter_0000100", "mp_rank_00", "model_optim_rng.pt")
    marker = str(tmp_path / "executed")
    state = torch.load(path, weights_only=False)
    state["rng_state"].append(_RunsCode(marker))
    torch.save(state, path)
    out["pickle"] = _error(export, ckpt, str(tmp_path / "o1"))
    out["pickle_executed"] = os.path.exists(marker)
    # common.pt of a torch_dist checkpoint alike.
    ckpt = _copy(fixtures, "llama", "torch_dist", tmp_path)
    common = os.path.join(ckpt, "iter_0000007", "common.pt")
    state = torch.load(common, weights_only=False)
    state["args"].evil = _RunsCode(marker)
    torch.save(state, common)
    out["common"] = _error(export, ckpt, str(tmp_path / "o2"))
    out["common_executed"] = os.path.exists(marker)

    # A missing rank file.
    ckpt = _copy(fixtures, "llama", "legacy_tp2pp2", tmp_path)
    os.remove(os.path.join(ckpt, "iter_0000100", "mp_rank_01_001", "model_optim_rng.pt"))
    out["missing"] = _error(export, ckpt, str(tmp_path / "o3"))

    # A rank whose shard has another shape.
    ckpt = _copy(fixtures, "gpt", "legacy_tp2pp2", tmp_path)
    path = os.path.join(ckpt, "iter_0000100", "mp_rank_01_000", "model_optim_rng.pt")
    state = torch.load(path, weights_only=False)
    name = "decoder.layers.1.self_attention.linear_proj.weight"
    state["model"][name] = state["model"][name][:, :-1].clone()
    torch.save(state, path)
    out["shape"] = _error(export, ckpt, str(tmp_path / "o4"))

    # args naming an architecture no family has, or disagreeing with --hf-config.
    for arg, value in (("squared_relu", True), ("num_experts", 8),
                       ("position_embedding_type", "none")):
        ckpt = _copy(fixtures, "gpt", "legacy_tp1pp1", tmp_path / arg)
        path = os.path.join(ckpt, "iter_0000100", "mp_rank_00", "model_optim_rng.pt")
        state = torch.load(path, weights_only=False)
        setattr(state["args"], arg, value)
        torch.save(state, path)
        out[arg] = _error(export, ckpt, str(tmp_path / f"o_{arg}"))
    out["hf_config"] = _error(export, os.path.join(fixtures, "llama", "legacy_tp1pp1"),
                              str(tmp_path / "o5"),
                              hf_config_path=os.path.join(fixtures, "gpt", "hf"))

    # A harmless type outside the allow-list: refused, then loaded with --trust-pickle.
    from fractions import Fraction

    from megatron_patch import cli

    ckpt = _copy(fixtures, "gpt", "legacy_tp1pp1", tmp_path / "trust")
    path = os.path.join(ckpt, "iter_0000100", "mp_rank_00", "model_optim_rng.pt")
    state = torch.load(path, weights_only=False)
    state["args"].lr_ratio = Fraction(1, 3)
    torch.save(state, path)
    command = ["convert", "megatron-to-hf", ckpt, str(tmp_path / "o6")]
    out["untrusted_rc"] = cli.main(command)
    out["trusted_rc"] = cli.main([*command, "--trust-pickle"])
    out["trusted_files"] = sorted(os.listdir(tmp_path / "o6"))
    out["import_rc"] = cli.main(["convert", "import-megatron", os.path.join(
        fixtures, "llama", "legacy_tp2pp2"), str(tmp_path / "o7"), "--tokenizer",
        os.path.join(fixtures, "llama", "hf")])
    out["imported_files"] = sorted(os.listdir(tmp_path / "o7"))
    return out


def test_megatron_lm_bad_inputs_are_clear_errors(fixtures, tmp_path):
    """Pickles with unexpected objects (refused unexecuted; --trust-pickle lifts it), a missing
    rank file, ranks that disagree on a shape, args or --hf-config naming an unsupported or
    different architecture: errors naming the file, tensor or arg. Also the CLI's commands."""
    (out,) = harness.run(_bad_inputs, 1, fixtures, str(tmp_path))
    assert "mp_rank_00/model_optim_rng.pt: refusing to unpickle builtins.exec" in out["pickle"]
    assert "--trust-pickle" in out["pickle"]
    assert out["pickle_executed"] is False
    assert "common.pt: refusing to unpickle builtins.exec" in out["common"]
    assert out["common_executed"] is False
    assert "mp_rank_01_001/model_optim_rng.pt is missing" in out["missing"]
    assert ("decoder.layers.1.self_attention.linear_proj.weight has different shapes" in
            out["shape"] and "mp_rank_01_000" in out["shape"]), out["shape"]
    assert "squared_relu=True" in out["squared_relu"]
    assert "num_experts=8" in out["num_experts"]
    assert "position_embedding_type='none'" in out["position_embedding_type"]
    assert "num_layers" not in out["hf_config"] and "normalization" in out["hf_config"]
    assert out["untrusted_rc"] == 2 and out["trusted_rc"] == 0, out
    assert "model.safetensors" in out["trusted_files"], out
    assert out["import_rc"] == 0, out
    assert {"hf", "latest_checkpointed_iteration.txt", "megatron_patch.json",
            "release"} <= set(out["imported_files"]), out


def _rope_scaling(args: argparse.Namespace) -> float:
    """Largest difference between the rotary frequencies of the config derived from `args`
    and Megatron-Core's RotaryEmbedding built from the same args."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_patch.convert import megatron_lm
    from megatron_patch.models import rope

    config = megatron_lm.derived_hf_config(args, VOCAB, "test")
    ours = rope.inv_freq(rope.rope_parameters(config), args.kv_channels)
    theirs = RotaryEmbedding(args.kv_channels, 1.0, rotary_base=args.rotary_base,
                             rope_scaling=args.use_rope_scaling,
                             rope_scaling_factor=args.rope_scaling_factor).inv_freq
    return (ours - theirs.cpu()).abs().max().item()


def test_megatron_lm_rope_scaling_is_megatron_cores():
    """args use_rope_scaling (Llama 3.1) and rotary_base give the frequencies Megatron-Core's
    RotaryEmbedding computes (float32 arithmetic on both sides: within 1e-7)."""
    args = _args("llama", 1, 1)
    args.kv_channels, args.rotary_base = 128, 500000
    args.use_rope_scaling, args.rope_scaling_factor = True, 8.0
    scaled = harness.run(_rope_scaling, 1, args)[0]
    args.use_rope_scaling = False
    plain = harness.run(_rope_scaling, 1, args)[0]
    assert scaled < 1e-7 and plain < 1e-7, (scaled, plain)

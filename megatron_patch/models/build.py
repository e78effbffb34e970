"""Model building: a family's Megatron-Core TransformerConfig, the GPTModel of a pipeline stage,
the parallel-layout check, and "the model of an HF config or of a checkpoint" (`build_stages`,
`from_checkpoint`), which conversion, training, generation and the API all go through."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from megatron_patch import checkpoint, cpu_mode
from megatron_patch.errors import read_json
from megatron_patch.models import rope
from megatron_patch.models.activations import ACTIVATIONS
from megatron_patch.models.registry import family_for
from megatron_patch.models.score_head import ScoreHead
from megatron_patch.models.spec import ModelArgs

# Function-level imports: models.layers, embedding, norm_head, inference_linear and gemma
# import megatron.core, needed only once a model is built (`megatron_patch.models`, which
# config reading and conversion planning import, stays without it); lora.checkpoint imports
# this module (a cycle).


def params_dtype_from_flags(args: Any) -> torch.dtype:
    """Megatron-LM's precision flags (--bf16, --fp16; fp32 without either) as a dtype."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def load_hf_config(path: str) -> dict[str, Any]:
    """config.json of an HF model directory, or of the HF files a converted checkpoint carries."""
    for candidate in (os.path.join(path, "config.json"), os.path.join(path, "hf", "config.json")):
        if os.path.isfile(candidate):
            config = read_json(candidate)
            if not isinstance(config, dict):
                raise ValueError(f"{candidate}: not a JSON object")
            return config
    raise FileNotFoundError(f"no config.json in {path} (nor in {path}/hf)")


def expert_tensor_parallel_size(args: ModelArgs, tp: int) -> int:
    """The expert tensor parallel size a model runs at with tensor parallel size `tp`:
    Megatron-Core's default (= TP), except that experts with biases (GPT-OSS) are kept whole
    (1: Megatron-Core supports expert biases only so, MoE 'parallel folding')."""
    return 1 if args.num_moe_experts is not None and args.add_bias_linear else tp


def checkpoint_expert_tensor_parallel_size(ckpt_dir: str, tp: int) -> int:
    """expert_tensor_parallel_size of the model a converted checkpoint holds (for entry points
    that set up the parallel layout before building the model)."""
    hf_config = load_hf_config(os.path.join(ckpt_dir, checkpoint.HF_DIR))
    return expert_tensor_parallel_size(family_for(hf_config).model_args(hf_config), tp)


def check_layout(args: ModelArgs, padded_vocab_size: int, tp: int, pp: int,
                 vpp: int | None = None, ep: int = 1, etp: int | None = None) -> None:
    """Refuse a parallel layout that cannot split this model, before any work is done.
    `etp`: the expert tensor parallel size (default: TP)."""
    etp = tp if etp is None else etp
    problems = []
    sizes = [("num_attention_heads", args.num_attention_heads),
             ("query groups", args.megatron_query_groups),
             ("padded vocab size", padded_vocab_size)]
    if args.num_moe_experts is None or args.moe_layer_freq is not None:
        sizes.append(("intermediate_size", args.ffn_hidden_size))
    if args.num_moe_experts is not None:
        if etp != expert_tensor_parallel_size(args, tp):
            problems.append(
                f"experts with biases are supported at expert tensor parallel size 1 only, not "
                f"{etp} (initialise with parallel.initialize(..., expert_tensor_parallel_size="
                f"{expert_tensor_parallel_size(args, tp)}), models.expert_tensor_parallel_size)"
                if args.add_bias_linear else
                f"expert tensor parallel size {etp} differs from TP={tp}")
        # Experts are split over the expert tensor parallel ranks (ETP: TP unless biased).
        if args.moe_ffn_hidden_size % etp:
            problems.append(f"expert intermediate size (moe_intermediate_size; Mixtral: "
                            f"intermediate_size)={args.moe_ffn_hidden_size} is not divisible by "
                            f"expert tensor parallel size {etp}")
        if args.moe_shared_expert_intermediate_size:
            sizes.append(("shared expert intermediate size",
                          args.moe_shared_expert_intermediate_size))
        if args.num_moe_experts % ep:
            problems.append(f"number of experts {args.num_moe_experts} is not divisible by "
                            f"expert parallel size {ep}")
    if ep > 1 and args.num_moe_experts is None:
        problems.append(f"expert parallel size {ep} needs a mixture-of-experts model")
    for what, n in sizes:
        if n % tp:
            problems.append(f"{what}={n} is not divisible by tensor parallel size {tp}")
    if args.megatron_query_groups % tp:
        if args.kv_replicas > 1:
            problems.append(f"(its {args.num_query_groups} KV head is built as "
                            f"{args.kv_replicas} identical copies, gcd(num_attention_heads="
                            f"{args.num_attention_heads}, 8); use TP <= {args.kv_replicas})")
        elif args.num_query_groups == 1:
            problems.append(f"(multi-query attention: the one KV head can be copied only into "
                            f"a number of groups dividing num_attention_heads="
                            f"{args.num_attention_heads}, and none from 2 to 8 does: TP=1 only)")
        else:
            problems.append(f"(num_key_value_heads={args.num_query_groups}: TP must divide it)")
    stages = pp * (vpp or 1)
    if args.num_layers % stages:
        problems.append(
            f"num_hidden_layers={args.num_layers} is not divisible into {stages} pipeline stages"
        )
    if problems:
        raise ValueError(f"parallel layout TP={tp} PP={pp} EP={ep} does not fit the model: "
                         + "; ".join(problems))


def transformer_config(args: ModelArgs, *, params_dtype: torch.dtype = torch.float32,
                       sequence_parallel: bool = False, **overrides: Any):
    """Megatron-Core TransformerConfig for `args` at the current parallel layout.

    Keep `perform_initialization` on for a model that will train: megatron-core 0.16 tags TP
    weights `tensor_model_parallel` only while initialising them, and untagged shards are left
    out of the gradient norm.
    """
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    kwargs: dict[str, Any] = dict(
        **_architecture(args),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        attention_softmax_in_fp32=True,
        # Fused kernels are CUDA/apex only; the unfused paths compute the same function.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        # Also on CPU: allocation follows torch.cuda.current_device(), which CPU mode points at
        # the CPU, and each rank initialises only its own shard (as on GPU).
        use_cpu_initialization=False,
    )
    if args.num_moe_experts is not None:
        kwargs.update(_moe_config(args))
    kwargs.update(overrides)
    if args.mla is not None:
        from megatron.core.transformer.transformer_config import MLATransformerConfig

        return MLATransformerConfig(**kwargs, **dict(args.mla))
    return TransformerConfig(**kwargs)


def _architecture(args: ModelArgs) -> dict[str, Any]:
    """The TransformerConfig fields that describe the model itself (not its layout)."""
    window = None if args.sliding_window is None else (args.sliding_window - 1, 0)
    return dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.megatron_query_groups,
        kv_channels=args.kv_channels,
        layernorm_epsilon=args.layernorm_epsilon,
        normalization=args.normalization,
        gated_linear_unit=args.gated_linear_unit,
        activation_func=ACTIVATIONS[args.activation].function,
        add_bias_linear=args.add_bias_linear,
        add_qkv_bias=args.add_qkv_bias,
        qk_layernorm=args.qk_layernorm,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        window_size=window,
        window_attn_skip_freq=None if args.window_pattern is None else list(args.window_pattern),
        layernorm_zero_centered_gamma=args.zero_centered_norms,
        softmax_scale=args.softmax_scale,
        rotary_interleaved=args.rotary_interleaved,
        softmax_type="learnable" if args.attention_sinks else "vanilla",
        activation_func_clamp_value=args.activation_clamp,
        glu_linear_offset=args.glu_linear_offset,
    )


def _moe_config(args: ModelArgs) -> dict[str, Any]:
    """Megatron-Core MoE settings: dropless top-k routing, as the Hugging Face models route."""
    from megatron.core import parallel_state

    return dict(
        num_moe_experts=args.num_moe_experts,
        moe_router_topk=args.moe_router_topk,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=args.moe_shared_expert_gate,
        moe_layer_freq=1 if args.moe_layer_freq is None else list(args.moe_layer_freq),
        moe_router_pre_softmax=args.moe_router_pre_softmax,
        moe_router_score_function=args.moe_router_score_function,
        moe_router_enable_expert_bias=args.moe_router_enable_expert_bias,
        moe_router_num_groups=args.moe_router_num_groups,
        moe_router_group_topk=args.moe_router_group_topk,
        moe_router_topk_scaling_factor=args.moe_router_topk_scaling_factor,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=args.moe_aux_loss_coeff,
        # Dropless: no capacity factor, every token reaches all of its top-k experts.
        moe_expert_capacity_factor=None,
        # Router logits and softmax in fp32 whatever the model dtype (Hugging Face takes the
        # softmax in fp32 too), so that low precision cannot reorder the top-k.
        moe_router_dtype="fp32",
        # The all-gather dispatcher needs only all-gather / reduce-scatter, which gloo has too.
        moe_token_dispatcher_type="allgather",
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=parallel_state.get_expert_tensor_parallel_world_size(),
    )


# Megatron-Core's LanguageModule constructor writes Transformer Engine's attention opt-outs into
# os.environ (all "1" for its default backend, "auto", which Transformer Engine also assumes when
# they are unset); a library must leave the process environment as it found it.
_TE_ATTENTION_VARIABLES = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")


@contextlib.contextmanager
def _environment_kept(names: tuple[str, ...]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def build_model(args: ModelArgs, config, hf_config: dict[str, Any], *,
                padded_vocab_size: int | None = None, pre_process: bool | None = None,
                post_process: bool | None = None, vp_stage: int | None = None,
                transformer_impl: str = "auto", core_attention: type | None = None):
    """The GPTModel of this pipeline stage (and virtual stage).

    transformer_impl: "local", "transformer_engine" or "auto" (TE where importable on a GPU).
    core_attention: the local layers' core attention, if not the default (models/flash.py).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from megatron_patch.models.layers import block_spec

    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                             vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                             vp_stage=vp_stage)
    with _environment_kept(_TE_ATTENTION_VARIABLES):
        model = GPTModel(
            config=config,
            transformer_layer_spec=block_spec(config, args.qk_layernorm, vp_stage,
                                              transformer_impl, args, core_attention),
            vocab_size=padded_vocab_size or args.vocab_size,
            max_sequence_length=args.max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=args.share_embeddings_and_output_weights,
            # ALiBi lives in the attention (models/alibi.py), not in the embedding.
            position_embedding_type=("none" if args.position_embedding_type == "alibi"
                                     else args.position_embedding_type),
            rotary_percent=args.rotary_percent,
            vp_stage=vp_stage,
        )
    _replace_parts(model, args, pre_process, post_process)
    if not cpu_mode.is_enabled():
        # Megatron-Core allocates its own layers on the current GPU; ours (norms) are moved
        # with it, as Megatron-LM's get_model does.
        model.cuda(torch.cuda.current_device())
    if args.position_embedding_type == "rope" and args.mla is None:
        _set_rope_frequencies(model, args, hf_config)
    return model


def _replace_parts(model, args: ModelArgs, pre_process: bool, post_process: bool) -> None:
    """The parts GPTModel's constructor cannot express (megatron-core internals, see
    docs/architecture.md): the embedding with position offsets, norm or scale; the output
    layer's NormHead, direct inference matmul and soft-capping."""
    if pre_process and (args.position_offset or args.embedding_norm or args.embedding_scale):
        from megatron_patch.models import embedding

        embedding.install(model, max_sequence_length=args.max_sequence_length,
                          position_embedding_type=args.position_embedding_type,
                          position_offset=args.position_offset, norm=args.embedding_norm,
                          scale=args.embedding_scale)
    if args.score_head and post_process:
        # megatron-core internal: GPTModel.output_layer replaced after construction (GPTModel
        # calls it as (hidden_states, weight=, runtime_gather_output=) and saves its `weight`
        # under output_layer.weight).
        model.output_layer = ScoreHead(model.config, args.hidden_size)
    elif args.norm_head and post_process:
        from megatron_patch.models.norm_head import NormHeadLinear

        NormHeadLinear.adopt(model.output_layer)
    elif post_process:
        from megatron_patch.models.inference_linear import InferenceColumnParallelLinear

        # The layers' linears come from the spec; GPTModel builds the output layer itself.
        InferenceColumnParallelLinear.adopt(model.output_layer)
        if args.final_logit_softcapping is not None:
            from megatron_patch.models.gemma import SoftcapOutputLinear

            SoftcapOutputLinear.adopt(model.output_layer, args.final_logit_softcapping)


def _set_rope_frequencies(model, args: ModelArgs, hf_config: dict[str, Any]) -> None:
    """The family's RoPE frequencies (scaling included) in place of Megatron-Core's, and the
    local layers' own base where the family has one. (MLA rotates inside its attention, with
    Megatron-Core's RoPE / YaRN frequencies: not called for it.)"""
    rotary_dim = int(args.kv_channels * args.rotary_percent)
    family = family_for(hf_config)
    params = (family.rope_parameters or rope.rope_parameters)(hf_config)
    model.rotary_pos_emb.inv_freq = rope.inv_freq(params, rotary_dim).to(
        model.rotary_pos_emb.inv_freq.device
    )
    if args.local_rope_theta is not None:
        local = rope.inv_freq({"rope_theta": args.local_rope_theta, "rope_type": "default"},
                              rotary_dim).to(model.rotary_pos_emb.inv_freq.device)
        for module in model.modules():
            if getattr(module, "local", False):
                module.local_inv_freq = local


@dataclass
class BuiltModel:
    """This rank's model chunks (one per virtual pipeline stage asked for) and what built them."""

    chunks: list
    args: ModelArgs
    config: Any  # megatron.core TransformerConfig


def build_stages(hf_config: dict[str, Any], padded_vocab_size: int, *,
                 params_dtype: torch.dtype = torch.float32, sequence_parallel: bool = False,
                 transformer_impl: str = "auto", vp_stages: list[int | None] | None = None,
                 pre_process: bool | None = None, post_process: bool | None = None,
                 core_attention: type | None = None, args: ModelArgs | None = None,
                 **config_overrides: Any) -> BuiltModel:
    """The model of an HF config at the current parallel layout, checked against it first: one
    GPTModel per entry of `vp_stages` (default: one, no virtual stage). `args`: the family's
    ModelArgs of `hf_config` unless given (a Megatron-LM import builds one KV group)."""
    from megatron.core import parallel_state

    if args is None:
        args = family_for(hf_config).model_args(hf_config)
    check_layout(args, padded_vocab_size,
                 parallel_state.get_tensor_model_parallel_world_size(),
                 parallel_state.get_pipeline_model_parallel_world_size(),
                 parallel_state.get_virtual_pipeline_model_parallel_world_size(),
                 ep=parallel_state.get_expert_model_parallel_world_size(),
                 etp=parallel_state.get_expert_tensor_parallel_world_size())
    config = transformer_config(args, params_dtype=params_dtype,
                                sequence_parallel=sequence_parallel, **config_overrides)
    chunks = [build_model(args, config, hf_config, padded_vocab_size=padded_vocab_size,
                          pre_process=pre_process, post_process=post_process,
                          vp_stage=vp_stage, transformer_impl=transformer_impl,
                          core_attention=core_attention)
              for vp_stage in (vp_stages or [None])]
    return BuiltModel(chunks, args, config)


def from_checkpoint(ckpt_dir: str, *, sequence_parallel: bool = False,
                    params_dtype: torch.dtype | None = None, **config_overrides: Any):
    """Build this rank's model for the current parallel layout and load a converted checkpoint.
    A LoRA training checkpoint loads as its base with the adapters merged into the weights.

    Returns (model, meta) where meta is the checkpoint's CheckpointMeta.
    """
    from megatron_patch.lora import checkpoint as lora_checkpoint

    meta = checkpoint.read_meta(ckpt_dir)
    hf_config = load_hf_config(os.path.join(ckpt_dir, checkpoint.HF_DIR))
    lora = lora_checkpoint.is_lora_checkpoint(ckpt_dir)
    if lora:  # the adapters attach to the local linears (TE fuses the norm in front of them)
        config_overrides["transformer_impl"] = "local"
    (model,) = build_stages(hf_config, meta.padded_vocab_size,
                            params_dtype=params_dtype or meta.torch_dtype,
                            sequence_parallel=sequence_parallel, **config_overrides).chunks
    if lora:
        lora_checkpoint.load_merged(ckpt_dir, model, hf_config, meta.padded_vocab_size)
    else:
        checkpoint.load_model(ckpt_dir, model)
    return model, meta

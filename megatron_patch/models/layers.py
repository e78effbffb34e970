"""Megatron-Core building blocks that the model zoo plugs in through the ModuleSpec system."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from megatron.core import tensor_parallel
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
    get_transformer_layer_offset,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_patch import cpu_mode
from megatron_patch.models.alibi import AlibiDotProductAttention
from megatron_patch.models.cached_rotary import CachedRotarySelfAttention

# Megatron's tensor-parallel linears, with a direct path for gradient-free TP=1 calls.
from megatron_patch.models.inference_linear import (
    InferenceColumnParallelLinear as ColumnParallelLinear,
)
from megatron_patch.models.inference_linear import (
    InferenceRowParallelLinear as RowParallelLinear,
)
from megatron_patch.models.parallel_layer import parallel_layer_spec
from megatron_patch.models.sdpa_attention import SDPADotProductAttention

# Function-level import: models.gemma imports Norm from this module (a cycle).

if TYPE_CHECKING:
    from megatron_patch.models.spec import ModelArgs


class Norm(torch.nn.Module):
    """LayerNorm or RMSNorm (per `config.normalization`) that works with sequence parallelism.

    Megatron-Core's local `WrappedTorchNorm` refuses sequence parallelism. Under SP every TP rank
    normalises a different slice of the sequence, so the weight gradients must be summed over TP:
    megatron's `finalize_model_grads` does that for parameters tagged `sequence_parallel`.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.rms = config.normalization == "RMSNorm"
        if config.normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"unsupported normalization {config.normalization!r}")
        # layernorm_zero_centered_gamma: the weight stores gamma - 1 (RMSNorm only here).
        self.zero_centered = config.layernorm_zero_centered_gamma
        if self.zero_centered and not self.rms:
            raise ValueError("layernorm_zero_centered_gamma is supported with RMSNorm only")
        self.eps = eps
        self.weight = torch.nn.Parameter(
            (torch.zeros if self.zero_centered else torch.ones)(hidden_size,
                                                                dtype=config.params_dtype))
        self.bias = (
            None if self.rms
            else torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        )
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 as Hugging Face does, result back in the input dtype.
        dtype = x.dtype
        h = x.float()
        if self.rms:
            h = torch.nn.functional.rms_norm(h, h.shape[-1:], eps=self.eps)
            if self.zero_centered:  # Gemma: scaled by 1 + weight in fp32, then cast
                return (h * (1.0 + self.weight.float())).to(dtype)
            return self.weight * h.to(dtype)
        h = torch.nn.functional.layer_norm(
            h, h.shape[-1:], self.weight.float(), self.bias.float(), self.eps
        )
        return h.to(dtype)


# megatron-core internal: the parameter tags DDP, finalize_model_grads and the optimizer read
# (allreduce, sequence_parallel, tensor_model_parallel), set on biased experts' linears below, and
# the expert MLP's in-place bias add (test_megatron_core_contract.py).
def _expert_parameters_of_their_own(linear: torch.nn.Module) -> None:
    """Experts with biases run at expert tensor parallel size 1: at TP > 1 each TP rank holds
    every expert whole and meets its own tokens (a slice of the sequence), so the experts'
    gradients must be summed over the expert data parallel group (which holds those TP ranks).
    Megatron-Core reduces parameters tagged allreduce=False there, but tags experts so only at
    EP > 1 (at EP = 1 they would be averaged over the dense data-parallel ranks only, and each
    TP rank's copy would drift)."""
    for param in linear.parameters():
        param.allreduce = False


class BiasedExpertColumnParallelLinear(tensor_parallel.ColumnParallelLinear):
    """The fc1 of experts with biases (GPT-OSS): see _expert_parameters_of_their_own."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _expert_parameters_of_their_own(self)


class BiasedExpertRowParallelLinear(tensor_parallel.RowParallelLinear):
    """The fc2 of experts with biases (GPT-OSS), which run at expert tensor parallel size 1.

    - Its parameters are reduced as experts' (_expert_parameters_of_their_own).
    - Its output is a tensor of its own while training: Megatron-Core 0.16's expert MLP adds the
      routing-weighted bias to fc2's output in place (transformer/mlp.py), and that output can
      be the very tensor the tensor-parallel reduction's autograd Function returned (it passes
      its input through on one rank), which autograd refuses.
    - Its bias is not tagged sequence-parallel: megatron tags every row-parallel bias so, and
      finalize_model_grads would then sum its gradient over the TP ranks once more, after the
      expert data parallel reduction summed it over them.
    - Its bias is tagged as a tensor-parallel one, as the experts' other parameters are: the
      expert optimizer counts untagged parameters in its gradient norm on TP rank 0 only but
      reduces the norm over the expert tensor/pipeline group (no TP peer in it at expert TP 1),
      so TP ranks would clip by different norms and their copies drift."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _expert_parameters_of_their_own(self)
        if self.bias is not None:
            self.bias.sequence_parallel = False
            tensor_parallel.set_tensor_model_parallel_attributes(self.bias, True, 0, 1)

    def forward(self, input_: torch.Tensor, *args, **kwargs):
        output, bias = super().forward(input_, *args, **kwargs)
        return (output.clone() if torch.is_grad_enabled() else output), bias


def _moe_mlp_spec(num_experts: int, biased: bool = False) -> ModuleSpec:
    """Megatron-Core's MoE layer (router, experts, optional shared expert) from its local
    modules: experts run one after the other (SequentialMLP)."""
    import dataclasses

    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe import moe_utils

    # megatron-core internal: sets a module global (test_megatron_core_contract.py).
    # megatron-core 0.16's router gating tests `te_general_gemm is not None` but defines the name
    # only when Transformer Engine imports (NameError without it); None selects its torch.mm path.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    spec = get_moe_module_spec(use_te=False, num_experts=num_experts, moe_grouped_gemm=False)
    if biased:
        experts = spec.submodules.experts
        experts.submodules = dataclasses.replace(
            experts.submodules, linear_fc1=BiasedExpertColumnParallelLinear,
            linear_fc2=BiasedExpertRowParallelLinear)
    return spec


def layer_spec(qk_layernorm: bool = False, num_experts: int | None = None,
               args: ModelArgs | None = None, core_attention: type | None = None
               ) -> ModuleSpec:
    """A decoder layer built from Megatron-Core's local (non-Transformer-Engine) modules.

    num_experts: a mixture-of-experts MLP with that many experts instead of a dense one.
    `args` (ModelArgs) plugs in the pieces Megatron-Core lacks: ALiBi attention
    (models/alibi.py) and parallel attention + MLP (models/parallel_layer.py).
    core_attention: a subclass of SDPADotProductAttention (--use-flash-attn: models/flash.py).
    """
    attention, core_attention, out_proj, fc2 = _family_modules(args, core_attention)
    keys_map = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
    if num_experts is None:
        keys_map["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
        mlp = ModuleSpec(
            module=MLP,
            submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=fc2),
        )
    else:
        # Transformer Engine's MoE layer keeps its own pre_mlp_layernorm (no fused norm+linear
        # in front of the router): same key here.
        mlp = _moe_mlp_spec(num_experts, biased=args is not None and args.add_bias_linear)
    if args is not None and args.mla is not None:
        self_attention = _mla_spec(core_attention)
        keys_map.pop("input_layernorm.")
    else:
        self_attention = ModuleSpec(
            module=attention,
            params={"attn_mask_type": AttnMaskType.causal},
            submodules=SelfAttentionSubmodules(
                linear_qkv=ColumnParallelLinear,
                core_attention=core_attention,
                linear_proj=out_proj,
                q_layernorm=Norm if qk_layernorm else IdentityOp,
                k_layernorm=Norm if qk_layernorm else IdentityOp,
            ),
        )
    spec = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=Norm,
            self_attention=self_attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=Norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            # Same checkpoint keys as Transformer Engine's fused norm+linear layers, so a
            # checkpoint loads into either implementation.
            sharded_state_dict_keys_map=keys_map,
        ),
    )
    if args is not None and args.parallel_attention:
        spec = parallel_layer_spec(spec, args.parallel_attention_norms)
    return spec


def _family_modules(args: ModelArgs | None, core_attention: type | None) -> tuple:
    """(self-attention, core attention, attention output projection, MLP output projection)
    of a layer: Megatron-Core's, or the pieces the family's `args` ask for (ALiBi, Gemma's
    soft-capping, post-norms and local rotary base)."""
    core_attention = core_attention or SDPADotProductAttention
    attention, out_proj, fc2 = CachedRotarySelfAttention, RowParallelLinear, RowParallelLinear
    if args is not None and args.position_embedding_type == "alibi":
        core_attention = AlibiDotProductAttention
    if args is not None and (args.attn_logit_softcapping or args.post_norms
                             or args.local_rope_theta is not None):
        from megatron_patch.models import gemma

        if args.attn_logit_softcapping:
            core_attention = ModuleSpec(module=gemma.SoftcapDotProductAttention,
                                        params={"softcap": args.attn_logit_softcapping})
        if args.post_norms:
            out_proj = fc2 = gemma.PostNormRowParallelLinear
        if args.local_rope_theta is not None:
            attention = gemma.LocalRotarySelfAttention
    return attention, core_attention, out_proj, fc2


def _mla_spec(core_attention) -> ModuleSpec:
    """Megatron-Core's multi-latent attention from local modules. Its projections must be
    megatron's own linear classes (it checks them by identity); the core attention is ours,
    which takes MLA's different query-key and value head sizes."""
    from megatron.core import tensor_parallel
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.multi_latent_attention import (
        MLASelfAttention,
        MLASelfAttentionSubmodules,
    )

    # megatron-core internal: 0.16 sets HAVE_TE when its TE extension module imports, which it
    # does without Transformer Engine too (TELinear a placeholder, not a class), and then
    # isinstance(x, TELinear) raises.
    if not isinstance(multi_latent_attention.TELinear, type):
        multi_latent_attention.HAVE_TE = False

    column = tensor_parallel.ColumnParallelLinear
    return ModuleSpec(
        module=MLASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=MLASelfAttentionSubmodules(
            linear_q_proj=column, linear_q_down_proj=column, linear_q_up_proj=column,
            linear_kv_down_proj=column, linear_kv_up_proj=column,
            core_attention=core_attention, linear_proj=tensor_parallel.RowParallelLinear,
            q_layernorm=LatentNorm, kv_layernorm=LatentNorm,
        ),
    )


class LatentNorm(Norm):
    """MLA's norms of the query and key-value latents: transformers' DeepSeek builds them with
    its RMSNorm default eps 1e-6, whatever the config's rms_norm_eps."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(config, hidden_size, eps=1e-6)


def needs_local_layers(args: ModelArgs | None) -> bool:
    """Whether `args` uses pieces that exist only as local (non-TE) modules."""
    return args is not None and (args.position_embedding_type == "alibi"
                                 or args.parallel_attention or args.post_norms
                                 or args.mla is not None
                                 or bool(args.attn_logit_softcapping)
                                 or args.local_rope_theta is not None
                                 # (tested with Megatron-Core's local softmax with sinks)
                                 or args.attention_sinks)


def transformer_engine_available() -> bool:
    if cpu_mode.is_enabled() or cpu_mode.wanted():  # also before an entry point switched it on
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def block_spec(config: TransformerConfig, qk_layernorm: bool = False,
               vp_stage: int | None = None, transformer_impl: str = "auto",
               args: ModelArgs | None = None, core_attention: type | None = None
               ) -> TransformerBlockSubmodules:
    """The decoder of this pipeline stage: its layers and the final norm.

    transformer_impl: "local" (Megatron-Core's own modules), "transformer_engine", or "auto"
    (Transformer Engine when it is importable on a GPU). Both write the same checkpoint keys.
    """
    if transformer_impl == "transformer_engine" and needs_local_layers(args):
        raise ValueError("ALiBi, parallel attention, Gemma and GPT-OSS layers exist only as local "
                         "modules; use transformer_impl='local' (or 'auto')")
    use_te = transformer_impl == "transformer_engine" or (
        transformer_impl == "auto" and transformer_engine_available()
        and not needs_local_layers(args))
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    # 1: a mixture-of-experts layer, 0: a dense one, for every layer of the model.
    pattern = (list(config.moe_layer_freq) if isinstance(config.moe_layer_freq, list)
               else [int(config.num_moe_experts is not None)] * config.num_layers)
    stage = pattern[offset:offset + num_layers]
    if use_te:
        # Not exercised by the CPU test suite: parity under TE needs a GPU run.
        from megatron.core.extensions.transformer_engine import TENorm
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        # MoE: grouped experts (TEGroupedMLP), whose checkpoint keys are SequentialMLP's.
        def te_layer(moe: int) -> ModuleSpec:
            experts = config.num_moe_experts if moe else None
            return get_gpt_layer_with_transformer_engine_spec(
                num_experts=experts, moe_grouped_gemm=experts is not None,
                qk_layernorm=qk_layernorm)

        return TransformerBlockSubmodules(layer_specs=[te_layer(m) for m in stage],
                                          layer_norm=TENorm)
    layers = {m: layer_spec(qk_layernorm, config.num_moe_experts if m else None, args,
                         core_attention)
              for m in set(stage)}
    return TransformerBlockSubmodules(layer_specs=[layers[m] for m in stage], layer_norm=Norm)

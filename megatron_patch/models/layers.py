"""Megatron-Core building blocks that the model zoo plugs in through the ModuleSpec system."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_patch.models.cached_rotary import CachedRotarySelfAttention

# Megatron's tensor-parallel linears, with a direct path for gradient-free TP=1 calls.
from megatron_patch.models.inference_linear import (
    InferenceColumnParallelLinear as ColumnParallelLinear,
)
from megatron_patch.models.inference_linear import (
    InferenceRowParallelLinear as RowParallelLinear,
)
from megatron_patch.models.sdpa_attention import SDPADotProductAttention

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
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
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
            return self.weight * h.to(dtype)
        h = torch.nn.functional.layer_norm(
            h, h.shape[-1:], self.weight.float(), self.bias.float(), self.eps
        )
        return h.to(dtype)


def _moe_mlp_spec(num_experts: int) -> ModuleSpec:
    """Megatron-Core's MoE layer (router, experts, optional shared expert) from its local
    modules: experts run one after the other (SequentialMLP)."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe import moe_utils

    # megatron-core 0.16's router gating tests `te_general_gemm is not None` but defines the name
    # only when Transformer Engine imports (NameError without it); None selects its torch.mm path.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    return get_moe_module_spec(use_te=False, num_experts=num_experts, moe_grouped_gemm=False)


def layer_spec(qk_layernorm: bool = False, num_experts: int | None = None,
               args: ModelArgs | None = None, core_attention: type | None = None
               ) -> ModuleSpec:
    """A decoder layer built from Megatron-Core's local (non-Transformer-Engine) modules.

    num_experts: a mixture-of-experts MLP with that many experts instead of a dense one.
    `args` (ModelArgs) plugs in the pieces Megatron-Core lacks: ALiBi attention
    (models/alibi.py) and parallel attention + MLP (models/parallel_layer.py).
    core_attention: a subclass of SDPADotProductAttention (--use-flash-attn: models/flash.py).
    """
    core_attention = core_attention or SDPADotProductAttention
    if args is not None and args.position_embedding_type == "alibi":
        from megatron_patch.models.alibi import AlibiDotProductAttention

        core_attention = AlibiDotProductAttention
    keys_map = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
    if num_experts is None:
        keys_map["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
        mlp = ModuleSpec(
            module=MLP,
            submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                     linear_fc2=RowParallelLinear),
        )
    else:
        # Transformer Engine's MoE layer keeps its own pre_mlp_layernorm (no fused norm+linear
        # in front of the router): same key here.
        mlp = _moe_mlp_spec(num_experts)
    spec = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=Norm,
            self_attention=ModuleSpec(
                module=CachedRotarySelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=core_attention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=Norm if qk_layernorm else IdentityOp,
                    k_layernorm=Norm if qk_layernorm else IdentityOp,
                ),
            ),
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
        from megatron_patch.models.parallel_layer import parallel_layer_spec

        spec = parallel_layer_spec(spec, args.parallel_attention_norms)
    return spec


def needs_local_layers(args: ModelArgs | None) -> bool:
    """Whether `args` uses pieces that exist only as local (non-TE) modules."""
    return args is not None and (args.position_embedding_type == "alibi"
                                 or args.parallel_attention)


def transformer_engine_available() -> bool:
    from megatron_patch import cpu_mode

    if cpu_mode.is_enabled():
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
        raise ValueError("ALiBi and parallel attention layers exist only as local modules; "
                         "use transformer_impl='local' (or 'auto')")
    use_te = transformer_impl == "transformer_engine" or (
        transformer_impl == "auto" and transformer_engine_available()
        and not needs_local_layers(args))
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    if use_te:
        # Not exercised by the CPU test suite: parity under TE needs a GPU run.
        from megatron.core.extensions.transformer_engine import TENorm
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        # MoE: grouped experts (TEGroupedMLP), whose checkpoint keys are SequentialMLP's.
        layer = get_gpt_layer_with_transformer_engine_spec(
            num_experts=config.num_moe_experts, moe_grouped_gemm=config.num_moe_experts is not None,
            qk_layernorm=qk_layernorm)
        return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=TENorm)
    return TransformerBlockSubmodules(
        layer_specs=[layer_spec(qk_layernorm, config.num_moe_experts, args,
                                core_attention)] * num_layers,
        layer_norm=Norm,
    )

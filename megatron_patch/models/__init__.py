"""Megatron-Core models of Hugging Face architectures (the package face: building lives in
`models/build.py`, families in `models/families/`, the family language in `models/spec.py`).

    from megatron_patch.models import load_hf_config, family_for, transformer_config, build_model

    hf_config = load_hf_config("path/to/hf_or_checkpoint")
    args = family_for(hf_config).model_args(hf_config)
    config = transformer_config(args)             # after megatron's parallel_state is initialised
    model = build_model(args, config, hf_config)  # a megatron.core GPTModel for this stage
"""

from megatron_patch.models.build import (
    ACTIVATIONS,
    BuiltModel,
    build_model,
    build_stages,
    check_layout,
    from_checkpoint,
    load_hf_config,
    params_dtype_from_flags,
    transformer_config,
)
from megatron_patch.models.registry import family_for, supported_architectures
from megatron_patch.models.spec import FamilySpec, ModelArgs, pad_vocab_size

__all__ = [
    "ACTIVATIONS", "BuiltModel", "FamilySpec", "ModelArgs", "build_model", "build_stages",
    "check_layout", "family_for", "from_checkpoint", "load_hf_config", "pad_vocab_size",
    "params_dtype_from_flags", "supported_architectures", "transformer_config",
]

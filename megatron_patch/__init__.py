"""megatron-patch: Hugging Face LLMs on Megatron-Core, and back.

The public Python API is `megatron_patch.api` (its names are also attributes of this package,
imported on first use). Importing this package or any of its modules patches nothing: CPU mode
(`megatron_patch.cpu_mode`) is switched on where CUDA is absent by `parallel.initialize`, which
every entry point calls first (tests/test_cpu_mode.py checks both). The top-level package stays
light (no torch) so the CLI starts fast.
"""

from typing import Any

__version__ = "0.1.0"


# megatron_patch.api.__all__ (tests/test_api.py checks they agree). Listed here so that other
# names (`from megatron_patch import cli` asks for one first) never import the API.
_API = frozenset({
    "HF_CONFIG_ENV", "ModelInfo", "add_megatron_lm_args", "build_model", "destroy_parallel",
    "export_hf_weights", "from_checkpoint", "initialize_parallel", "layer_spec",
    "load_hf_config", "load_hf_weights", "model_info", "model_provider", "save_checkpoint",
    "save_hf_pretrained", "supported_architectures", "transformer_config", "vocab_parallel_loss",
})


def __getattr__(name: str) -> Any:
    # PEP 562: `megatron_patch.build_model` imports the API (and torch) only when first used.
    if name in _API:
        from megatron_patch import api

        return getattr(api, name)
    raise AttributeError(f"module 'megatron_patch' has no attribute {name!r}")

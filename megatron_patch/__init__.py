"""megatron-patch: Hugging Face LLMs on Megatron-Core, and back.

Importing `megatron_patch.models` or `megatron_patch.parallel` switches on CPU mode
(`megatron_patch.cpu_mode`) where CUDA is absent; the top-level package stays light so the CLI
starts fast.
"""

__version__ = "0.1.0"

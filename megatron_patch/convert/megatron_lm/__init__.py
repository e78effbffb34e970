"""Checkpoints written by Megatron-LM (and the classic Pai-Megatron-Patch) as inputs.

Two layouts, both under Megatron-LM's checkpoint root, whose
`latest_checkpointed_iteration.txt` names "release" or the last iteration:

    iter_0000100/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt   legacy (`--ckpt-format torch`):
        one torch.save per tensor-parallel rank TT, pipeline rank PPP (only with PP > 1) and
        expert rank EEE (only with EP > 1), holding `args`, `iteration`, `checkpoint_version`,
        the model chunk's state dict under `model` (`model0`, `model1`, ... with virtual
        pipeline stages), the optimizer, scheduler and RNG states.
    iter_0000100/{common.pt, metadata.json, .metadata, __*.distcp}   `torch_dist`: Megatron-Core's
        dist_checkpointing, `args` in common.pt.

Neither carries Hugging Face files: the architecture comes from `args` (`architecture`), mapped
to a family of the zoo; `--hf-config` and `--tokenizer` supply what `args` cannot say.

Legacy state dicts use Megatron-Core's module names (`--use-mcore-models`, Megatron-LM's default
since 2024): the local spec's (`decoder.layers.0.input_layernorm.weight`) or Transformer Engine's
(`decoder.layers.0.self_attention.linear_qkv.layer_norm_weight`). The rank files are merged into
the unsharded tensors the family mappings describe (`read_legacy`). Megatron-LM's older models
(`--use-legacy-models`, Pai-Megatron-Patch's classic checkpoints: nested
`language_model.encoder.layers.0.self_attention.query_key_value.weight`,
`word_embeddings_for_head`) hold the same tensors in the same layouts and are renamed.

torch_dist checkpoints are read by Megatron-Core's own loader, which reshards them; its keys are
the ones megatron-patch's models save.

Legacy files and common.pt are pickles: `load_pickle` reads them with torch.load(weights_only=True)
and an allow-list, scoped to the call, of the types Megatron-LM stores there. Anything else is
refused, naming the file and the class, before anything is unpickled; `trust_pickle` lifts that
for a file the user trusts. (The DCP `.metadata` of a torch_dist checkpoint is unpickled by
PyTorch DCP inside Megatron-Core's loader, not here.)

Only the model's weights are carried over: optimizer, scheduler and RNG states are not.

Rooms: `pickles` (the allow-list), `locate` (iteration directory, layout, `args`),
`architecture` (the HF config of `args`), `legacy` (merging legacy rank files), `commands`
(`load`, `export_to_hf`, `import_megatron`, the `convert` options).
"""

from megatron_patch.convert.megatron_lm.architecture import (
    architecture,
    check_args_match,
    derived_hf_config,
)
from megatron_patch.convert.megatron_lm.commands import (
    add_arguments,
    export_to_hf,
    import_megatron,
    load,
    run,
)
from megatron_patch.convert.megatron_lm.legacy import rank_files, read_legacy
from megatron_patch.convert.megatron_lm.locate import (
    COMMON_FILE,
    LEGACY_FILE,
    is_megatron_lm_checkpoint,
    locate,
    read_args,
)
from megatron_patch.convert.megatron_lm.pickles import PickleRefused, load_pickle, pickle_globals

__all__ = [
    "COMMON_FILE", "LEGACY_FILE", "PickleRefused", "add_arguments", "architecture",
    "check_args_match", "derived_hf_config", "export_to_hf", "import_megatron",
    "is_megatron_lm_checkpoint", "load", "load_pickle", "locate", "pickle_globals",
    "rank_files", "read_args", "read_legacy", "run",
]

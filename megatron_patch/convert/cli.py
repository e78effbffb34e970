"""`megatron-patch convert DIRECTION SRC DST`: its three directions (each a sub-command with
its own flags and help) and what runs them."""

from __future__ import annotations

import argparse

from megatron_patch import errors
from megatron_patch.convert import megatron_lm

# Function-level imports: hf_megatron and the LoRA export are only needed when a conversion
# runs, not for the parser or its help.


def add_arguments(convert: argparse.ArgumentParser) -> None:
    """`convert DIRECTION SRC DST`, each direction with its own flags and help."""
    directions = convert.add_subparsers(dest="direction", required=True, metavar="DIRECTION",
                                        parser_class=errors.ArgumentParser)
    to_megatron = directions.add_parser("hf-to-megatron", help="an HF model directory -> a "
                                        "Megatron-Core checkpoint that loads at any TP/PP")
    to_megatron.add_argument("src", help="HF model directory (config.json, safetensors)")
    to_megatron.add_argument("dst", help="output checkpoint directory")
    to_megatron.add_argument("--make-vocab-size-divisible-by", type=errors.positive_int,
                             default=128, help="pad the vocabulary to a multiple of this "
                                               "times TP (default 128)")
    to_megatron.add_argument("--tensor-model-parallel-size", type=errors.positive_int,
                             default=1, help="pad the vocabulary for this TP size (it loads at "
                                             "any TP that divides the padded size)")
    to_megatron.add_argument("--extra-vocab-size", type=errors.nonnegative_int, default=0,
                             help="extra embedding rows before padding")
    to_megatron.add_argument("--params-dtype", choices=["float32", "float16", "bfloat16"],
                             help="store weights in this dtype (default: the source's)")

    to_hf = directions.add_parser("megatron-to-hf", help="a Megatron checkpoint (megatron-patch's, "
                                  "a LoRA run's, or Megatron-LM's) -> an HF model directory")
    to_hf.add_argument("src", help="checkpoint directory: megatron-patch's (any iteration, any "
                                   "layout it was saved at), a LoRA training run's, or "
                                   "Megatron-LM's (legacy or torch_dist)")
    to_hf.add_argument("dst", help="output HF directory")
    to_hf.add_argument("--max-shard-size", default="5GB",
                       help="largest safetensors file, decimal units (default 5GB, "
                            "transformers 4.x's save_pretrained default; 5.x uses 50GB)")
    to_hf.add_argument("--merge-lora", action="store_true",
                       help="a LoRA training checkpoint: write the full HF model with the "
                            "adapters merged into its weights (default: a PEFT adapter "
                            "directory, adapter_config.json + adapter_model.safetensors)")
    to_hf.add_argument("--lora-base-model-name-or-path", default=None, metavar="NAME_OR_DIR",
                       help="the exported PEFT adapter's base_model_name_or_path: the HF model "
                            "(hub name or directory) its base was converted from (default: as "
                            "recorded at training)")

    import_lm = directions.add_parser("import-megatron", help="a Megatron-LM checkpoint (legacy "
                                      "or torch_dist) -> a megatron-patch checkpoint")
    import_lm.add_argument("src", help="Megatron-LM checkpoint root or iteration directory")
    import_lm.add_argument("dst", help="output checkpoint directory")
    for parser in (to_hf, import_lm):
        parser.add_argument("--iteration", default=None, type=errors.iteration,
                            help="convert this iteration instead of the latest")
        megatron_lm.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """The direction chosen, on the checkpoint given."""
    from megatron_patch.convert import hf_megatron
    from megatron_patch.lora import checkpoint as lora_checkpoint

    lora = args.direction == "megatron-to-hf" and lora_checkpoint.is_lora_checkpoint(args.src)
    if getattr(args, "merge_lora", False) and not lora:
        raise ValueError(f"--merge-lora: {args.src} is not a LoRA training checkpoint (it has "
                         f"no {lora_checkpoint.LORA_FILE}); only megatron-to-hf of one merges")
    base_name = getattr(args, "lora_base_model_name_or_path", None)  # megatron-to-hf's flag
    if base_name and not (lora and not args.merge_lora):
        raise ValueError("--lora-base-model-name-or-path: only the PEFT adapter exported from a "
                         "LoRA training checkpoint (megatron-to-hf without --merge-lora) names "
                         "its base")
    if lora:
        files = lora_checkpoint.export(args.src, args.dst, iteration=args.iteration,
                                       merge=args.merge_lora, max_shard_size=args.max_shard_size,
                                       base_model_name_or_path=base_name)
        what = "merged HF model" if args.merge_lora else "PEFT adapter"
        print(f"{args.dst}: {what} ({', '.join(files)})")
        return 0
    if args.direction == "import-megatron" or (
            args.direction == "megatron-to-hf" and megatron_lm.is_megatron_lm_checkpoint(args.src)):
        return megatron_lm.run(args)
    if args.direction == "hf-to-megatron":
        import torch

        dtype = getattr(torch, args.params_dtype) if args.params_dtype else None
        meta = hf_megatron.hf_to_megatron(
            args.src, args.dst,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            extra_vocab_size=args.extra_vocab_size, params_dtype=dtype,
        )
        print(f"{args.dst}: {meta.architecture}, vocab {meta.vocab_size} padded to "
              f"{meta.padded_vocab_size}, {meta.dtype}")
    else:
        files = hf_megatron.megatron_to_hf(args.src, args.dst, max_shard_size=args.max_shard_size,
                                           iteration=args.iteration)
        print(f"{args.dst}: {len(files)} safetensors file(s)")
    return 0

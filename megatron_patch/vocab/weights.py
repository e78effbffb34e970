"""Weight growth: extend an HF model directory or a megatron-patch checkpoint, each new embedding
(and output) row the mean of the rows of the pieces the original tokenizer split it into."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from megatron_patch.vocab.formats import SP_MODEL, TOKENIZER_JSON
from megatron_patch.vocab.planning import Plan, plan_pieces
from megatron_patch.vocab.tokenizer_files import TokenizerFiles

# Function-level imports: models, convert.hf_io, convert.hf_megatron and checkpoint import
# torch (megatron.core); planning a vocabulary extension (the light CLI) does not need them.

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass
class ExtensionSummary:
    """What an extension did. `added` lists the new pieces (model spelling) in id order."""

    requested: int = 0
    added: list[str] = field(default_factory=list)
    intermediate: int = 0
    duplicates: int = 0
    split: int = 0  # texts the pre-tokenizer splits: never one piece, skipped
    unreachable: list[str] = field(default_factory=list)  # pieces (model spelling)
    first_new_id: int = 0
    old_tokenizer_size: int = 0
    new_tokenizer_size: int = 0
    old_vocab_size: int = 0
    new_vocab_size: int = 0
    inconsistent: int = 0  # sample texts tokenizer.model and tokenizer.json encode differently

    def lines(self) -> list[str]:
        return [
            f"pieces requested: {self.requested}, skipped: {self.duplicates} duplicates, "
            f"{self.split} split by the pre-tokenizer",
            f"pieces added: {len(self.added)} ({self.intermediate} of them intermediate)"
            + (f", ids {self.first_new_id}..{self.first_new_id + len(self.added) - 1}"
               if self.added else ""),
            f"unreachable (added, but not produced by the tokenizer on their own): "
            f"{len(self.unreachable)}",
            f"tokenizer size {self.old_tokenizer_size} -> {self.new_tokenizer_size}, "
            f"vocab_size (embedding rows) {self.old_vocab_size} -> {self.new_vocab_size}",
        ]


def _vocab_tensor_names(hf_config: dict[str, Any]) -> list[str]:
    """The HF names of the embedding and (untied) output matrices, from the family's mapping."""
    from megatron_patch.models import family_for
    from megatron_patch.models.weight_rules import Vocab, bind

    family = family_for(hf_config)
    args = family.model_args(hf_config)
    names = [n for b in bind(family.weights, hf_config, args.num_layers)
             if isinstance(b.transform, Vocab) for n in b.hf]
    if not names:
        raise ValueError(f"{family.name}: no vocabulary tensors in its weight mapping")
    return names


def _vocab_size_key(hf_config: dict[str, Any]) -> str:
    from megatron_patch.models import family_for

    keys = [f.hf for f in family_for(hf_config).config_fields if f.megatron == "vocab_size"]
    return keys[0] if keys else "vocab_size"


def grow_rows(weight: torch.Tensor, new_rows: int, sources: dict[int, list[int]],
              reference_rows: int) -> torch.Tensor:
    """`weight` with `new_rows` rows: row i in `sources` is the mean of the original rows
    sources[i] (computed in fp32); other rows past the original ones are the mean of the first
    `reference_rows` rows; every other row is the original, untouched."""
    import torch

    old_rows = weight.shape[0]
    out = torch.empty((max(new_rows, old_rows), *weight.shape[1:]), dtype=weight.dtype)
    out[:old_rows] = weight
    if new_rows > old_rows:
        out[old_rows:] = weight[:reference_rows].float().mean(0).to(weight.dtype)
    for row, ids in sources.items():
        out[row] = weight[ids].float().mean(0).to(weight.dtype)
    return out


def extend_hf(src: str, dst: str, texts: list[str], *, make_vocab_size_divisible_by: int = 128,
              max_shard_size: int | str = "5GB",
              sample_texts: Iterable[str] = ()) -> ExtensionSummary:
    """Extend an HF model directory's tokenizer and vocabulary matrices into `dst`."""
    from megatron_patch.convert import hf_io
    from megatron_patch.models import load_hf_config, pad_vocab_size

    hf_io.check_output_dir(dst)
    hf_config = load_hf_config(src)
    tensor_names = _vocab_tensor_names(hf_config)
    size_key = _vocab_size_key(hf_config)
    old_vocab = int(hf_config[size_key])
    files = TokenizerFiles(src)
    if files.size > old_vocab:
        raise ValueError(f"{src}: the tokenizer has {files.size} ids but config.json "
                         f"{size_key}={old_vocab}")
    plan = plan_pieces(files.table, texts, files.spell)
    log.info("%s: %d new pieces planned from %d texts", src, len(plan.pieces), len(texts))
    files.append(plan.pieces)
    new_size = files.table.next_id
    new_vocab = (old_vocab if new_size <= old_vocab
                 else pad_vocab_size(new_size, make_vocab_size_divisible_by))
    sources = {files.table.vocab[p]: files.old_ids(p) for p in plan.pieces}

    with hf_io.staged(dst) as staging:
        hf_io.copy_non_weight_files(src, staging)
        files.save(staging, plan.pieces)
        files.check_saved(staging, plan.pieces)
        hf_config[size_key] = new_vocab
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
            f.write("\n")

        log.info("writing %s (vocab_size %d -> %d)", dst, old_vocab, new_vocab)
        _write_grown_weights(src, staging, tensor_names, size_key, old_vocab, new_vocab, sources,
                             files.size, max_shard_size)
    return _summary(files, plan, texts, sample_texts, old_vocab, new_vocab)


def _write_grown_weights(src: str, out_dir: str, tensor_names: list[str], size_key: str,
                         old_vocab: int, new_vocab: int, sources: dict[int, list[int]],
                         reference_rows: int, max_shard_size: int | str) -> None:
    """src's weights into out_dir, the vocabulary matrices `tensor_names` (old_vocab rows, as
    config.json's `size_key` says) grown to new_vocab rows (grow_rows)."""
    from megatron_patch.convert import hf_io

    reader = hf_io.HFCheckpointReader(src)
    missing = [n for n in tensor_names if n not in reader.names()]
    if missing:
        raise ValueError(f"{src}: no tensor {missing}")

    def tensors():
        for name in reader.names():
            tensor = reader.read(name)
            if name in tensor_names:
                if tensor.shape[0] != old_vocab:
                    raise ValueError(f"{src}: {name} has {tensor.shape[0]} rows, config.json "
                                     f"{size_key}={old_vocab}")
                tensor = grow_rows(tensor, new_vocab, sources, reference_rows)
            yield name, tensor

    # Tensors passed on unchanged are copied from the input files (file_regions).
    hf_io.write_safetensors_shards(out_dir, tensors(), max_shard_size, regions=reader.regions)
    reader.close()


def _summary(files: TokenizerFiles, plan: Plan, texts: list[str], sample_texts: Iterable[str],
             old_vocab: int, new_vocab: int) -> ExtensionSummary:
    """What an extension did, warning about new pieces that do not encode as themselves and
    texts the two tokenizer files encode differently."""
    requested = [p for p in plan.pieces if p in plan.requested]
    if missed := files.not_single(requested):
        log.warning("%d new pieces are not encoded as themselves by %s, e.g. %s", len(missed),
                    TOKENIZER_JSON, missed[:5])
    summary = ExtensionSummary(
        requested=len(texts), added=plan.pieces, intermediate=len(plan.pieces) - len(requested),
        duplicates=plan.duplicates, split=plan.split,
        unreachable=plan.unreachable + [p for p in missed if p not in plan.unreachable],
        first_new_id=files.size,
        old_tokenizer_size=files.size, new_tokenizer_size=files.table.next_id,
        old_vocab_size=old_vocab, new_vocab_size=new_vocab,
        inconsistent=files.inconsistencies(
            [t for t in [*texts, *sample_texts] if t.strip()]),
    )
    if summary.inconsistent:
        log.warning("%d sample texts encode differently with %s and %s", summary.inconsistent,
                    SP_MODEL, TOKENIZER_JSON)
    return summary


def extend_megatron(src: str, dst: str, texts: list[str], *,
                    make_vocab_size_divisible_by: int = 128, tensor_model_parallel_size: int = 1,
                    iteration: int | str | None = None,
                    sample_texts: Iterable[str] = ()) -> ExtensionSummary:
    """Extend a megatron-patch checkpoint: export to HF (bit-exact), extend, convert back.

    The padded size stays the checkpoint's while the vocabulary fits in it; otherwise it is the
    new vocabulary padded to make_vocab_size_divisible_by x tensor_model_parallel_size. The
    result is a `release` checkpoint of weights only (optimizer states do not fit the new
    shapes)."""
    from megatron_patch import checkpoint
    from megatron_patch.convert import hf_io, hf_megatron
    from megatron_patch.models import pad_vocab_size

    hf_io.check_output_dir(dst)
    meta = checkpoint.read_meta(src)
    # The HF copies go next to the output: /tmp may not hold a large model twice.
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".extend-vocab-", dir=parent) as tmp:
        old_hf, new_hf = os.path.join(tmp, "old"), os.path.join(tmp, "new")
        hf_megatron.megatron_to_hf(src, old_hf, iteration=iteration)
        summary = extend_hf(old_hf, new_hf, texts,
                            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                            sample_texts=sample_texts)
        padded = meta.padded_vocab_size
        if summary.new_vocab_size > padded:
            padded = pad_vocab_size(summary.new_vocab_size,
                                    make_vocab_size_divisible_by * tensor_model_parallel_size)
        hf_megatron.hf_to_megatron(new_hf, dst, make_vocab_size_divisible_by=1,
                                   extra_vocab_size=padded - summary.new_vocab_size,
                                   params_dtype=meta.torch_dtype)
    return summary


def is_megatron_checkpoint(path: str) -> bool:
    from megatron_patch import checkpoint

    return os.path.isfile(os.path.join(path, checkpoint.META))

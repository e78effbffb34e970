"""The public Python API (megatron_patch.api): build, in-memory HF load and export, checkpoints,
Megatron-LM's model_provider, and the custom-training example.

Oracles: the model loaded from the converted checkpoint (the file conversion, itself checked
against transformers by test_zoo) for logits, and the HF files themselves for export. Both are
bit-exact comparisons: in-memory loading must put the same bits in the same places as the
conversion, and the forward pass is then the same computation.
"""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import harness
import pytest
from test_zoo import CASES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (TP, PP, EP, SP, VPP), all run in one world of 2 ranks: (1, 1) is then DP=2.
DENSE_LAYOUTS = ((1, 1, 1, False, None), (2, 1, 1, True, None), (1, 2, 1, False, None),
                 (1, 2, 1, False, 2))
MOE_LAYOUTS = ((1, 1, 2, False, None),)


def _same_bits(a, b) -> bool:
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _logits_by_microbatch(chunks, tokens, vocab_size):
    """Logits of each sequence of `tokens` run as a micro-batch of its own: the interleaved
    schedule (virtual stages) needs at least PP micro-batches. On the last stage, else None."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_patch.forward import gather_vocab

    batches = [tokens[i:i + 1] for i in range(len(tokens))]
    positions = torch.arange(tokens.shape[1]).unsqueeze(0)

    def step(data_iterator, chunk):
        batch = next(data_iterator)
        return chunk(batch, positions, None), lambda out: (
            out.sum() * 0, {"logits": gather_vocab(out, vocab_size).detach()})

    with torch.no_grad():
        outs = get_forward_backward_func()(
            forward_step_func=step, data_iterator=[iter(batches) for _ in chunks], model=chunks,
            num_microbatches=len(batches), seq_length=tokens.shape[1], micro_batch_size=1,
            forward_only=True)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return torch.cat([o["logits"] for o in outs])


def _api_parity(dirs: dict[str, str], moe: list[str]) -> dict[str, list[str]]:
    """At each layout, for each case: logits of the API model loaded in memory vs the model
    loaded from the converted checkpoint, and the in-memory export vs the HF files."""
    import re

    import torch

    from megatron_patch import api
    from megatron_patch.convert import hf_io
    from megatron_patch.forward import forward_logits
    from megatron_patch.models import family_for

    problems: dict[str, list[str]] = {}
    for tp, pp, ep, sp, vpp in DENSE_LAYOUTS + MOE_LAYOUTS:
        layout = f"tp{tp}pp{pp}ep{ep}{'sp' if sp else ''}{f'vpp{vpp}' if vpp else ''}"
        api.initialize_parallel(tp, pp, vpp, expert_model_parallel_size=ep)
        for name, root in dirs.items():
            if ep > 1 and name not in moe:
                continue
            key = f"{name}/{layout}"
            problems[key] = []
            ref = torch.load(os.path.join(root, "reference.pt"))
            hf_dir = os.path.join(root, "hf")
            chunks = api.build_model(hf_dir, sequence_parallel=sp)
            api.load_hf_weights(chunks, hf_dir)
            for chunk in chunks:
                chunk.eval()
            vocab = api.model_info(chunks).vocab_size
            if vpp is None:
                ours = forward_logits(chunks, ref["tokens"], vocab)
                loaded, _ = api.from_checkpoint(os.path.join(root, "mcore"),
                                                sequence_parallel=sp)
                loaded.eval()
                theirs = forward_logits([loaded], ref["tokens"], vocab)
                if ours is not None and not _same_bits(ours["logits"], theirs["logits"]):
                    diff = (ours["logits"] - theirs["logits"]).abs().max().item()
                    problems[key].append(f"logits differ from the checkpoint's by {diff:.3g}")
            # Virtual stages have no converted-checkpoint twin here: the oracle's logits, to
            # test_zoo's tolerance (fp32; reduction order differs from transformers).
            else:
                logits = _logits_by_microbatch(chunks, ref["tokens"], vocab)
                if logits is not None and (logits - ref["logits"]).abs().max() > 1e-4:
                    problems[key].append("logits differ from the oracle's")
            reader = hf_io.HFCheckpointReader(hf_dir)
            ignore = family_for(api.model_info(chunks).hf_config).hf_ignore
            expected = {n for n in reader.names()
                        if not any(re.fullmatch(p, n) for p in ignore)}
            seen = []
            for hf_name, tensor in api.export_hf_weights(chunks):
                seen.append(hf_name)
                if hf_name in expected and not _same_bits(tensor, reader.read(hf_name)):
                    problems[key].append(f"export of {hf_name} differs from the HF file")
            reader.close()
            if sorted(seen) != sorted(expected):
                problems[key].append(f"export names differ: extra {set(seen) - expected}, "
                                     f"missing {expected - set(seen)}")
    return problems


def test_in_memory_load_and_export_at_every_layout(zoo_models):
    """Every zoo family at (TP, PP) = (1,1), (2,1)+SP, (1,2), (1,2)x2 virtual stages, and MoE
    families at EP=2: in-memory HF load gives the converted checkpoint's logits bit for bit, and
    the in-memory export gives the HF files' tensors bit for bit."""
    moe = [n for n, c in CASES.items() if any(lay.ep > 1 for lay in c.layouts)]
    reports = harness.run(_api_parity, 2, zoo_models, moe)
    assert len(reports[0]) == len(CASES) * len(DENSE_LAYOUTS) + len(moe) * len(MOE_LAYOUTS)
    bad = {k: v for r in reports for k, v in r.items() if v}
    assert not bad, bad

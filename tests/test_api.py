"""The public Python API (megatron_patch.api): build, in-memory HF load and export, checkpoints,
Megatron-LM's model_provider, and the custom-training example.

Oracles: the model loaded from the converted checkpoint (the file conversion, itself checked
against transformers by test_zoo) for logits, and the HF files themselves for export. Both are
bit-exact comparisons: in-memory loading must put the same bits in the same places as the
conversion, and the forward pass is then the same computation.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys

import harness
import pytest
import zoo
from zoo import CASES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (TP, PP, EP, SP, VPP), all run in one world of 2 ranks ((1, 1) is then DP=2), for each zoo
# case that test_zoo runs at that (TP, PP, EP, SP); virtual stages for a few kinds of model
# (tied embeddings split over the first and last stage, MoE, fused q;k;v, a norm after the
# embedding, multi-query attention), to keep the test short.
LAYOUTS = ((1, 1, 1, False, None), (2, 1, 1, True, None), (1, 2, 1, False, None),
           (1, 2, 1, False, 2), (1, 1, 2, False, None))
VPP_CASES = ("qwen2_tied", "mixtral", "chatglm3", "bloom", "falcon7b_style")


def _runs_at(case, layout) -> bool:
    tp, pp, ep, sp, vpp = layout
    return zoo.Layout(tp, pp, ep, sp) in case.layouts and (vpp is None or case.name in VPP_CASES)


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


def _api_parity(dirs: dict[str, str]) -> dict[str, list[str]]:
    """At each layout, for each case: logits of the API model loaded in memory vs the model
    loaded from the converted checkpoint, and the in-memory export vs the HF files."""
    import torch

    from megatron_patch import api
    from megatron_patch.convert import hf_io
    from megatron_patch.forward import forward_logits
    from megatron_patch.models import family_for

    problems: dict[str, list[str]] = {}
    for tp, pp, ep, sp, vpp in LAYOUTS:
        layout = f"tp{tp}pp{pp}ep{ep}{'sp' if sp else ''}{f'vpp{vpp}' if vpp else ''}"
        here = {n: r for n, r in dirs.items() if _runs_at(CASES[n], (tp, pp, ep, sp, vpp))}
        current_etp = None
        for name, root, etp in [(n, r, etp) for etp, group in harness.by_expert_tp(here, tp)
                                for n, r in group.items()]:
            if etp != current_etp:
                api.initialize_parallel(tp, pp, vpp, expert_model_parallel_size=ep,
                                        expert_tensor_parallel_size=etp)
                current_etp = etp
            key = f"{name}/{layout}"
            problems[key] = []
            ref = torch.load(os.path.join(root, "reference.pt"))
            hf_dir = os.path.join(root, "hf")
            chunks = api.build_model(hf_dir, sequence_parallel=sp)
            family = family_for(api.model_info(chunks).hf_config)
            reader = hf_io.HFCheckpointReader(hf_dir)
            kept = family.kept_names(api.model_info(chunks).hf_config, reader.names())
            reader.close()
            if kept:
                # The MTP layer has no module in the live model: refused, naming the tensors.
                try:
                    api.load_hf_weights(chunks, hf_dir)
                    problems[key].append("a checkpoint with kept (MTP) tensors was loaded")
                except ValueError as e:
                    if "multi-token prediction" not in str(e):
                        problems[key].append(f"unexpected refusal: {e}")
                continue
            try:
                api.load_hf_weights(chunks, hf_dir)
            except Exception as e:
                raise RuntimeError(f"{key}: {e}") from e
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
            ignore = family.hf_ignore
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
    reports = harness.run(_api_parity, 2, zoo_models)
    assert len(reports[0]) == sum(_runs_at(c, lay) for c in CASES.values() for lay in LAYOUTS)
    bad = {k: v for r in reports for k, v in r.items() if v}
    assert not bad, bad


# Peak memory test: a model whose tied embedding (LARGE_VOCAB x HIDDEN fp32, ~32 MiB; padded
# to 32768 rows in Megatron, so that it is not a plain copy) dwarfs
# everything else, saved in several shards.
LARGE_VOCAB, HIDDEN = 32700, 256
MIB = 2**20
# What may come on top of the one largest tensor: Python and torch bookkeeping, the few small
# tensors of one mapping rule, transformers' meta-device model for the expected shapes.
MEMORY_SLACK = 12 * MIB


def _peak_rss_of(fn) -> tuple[int, object]:
    """Bytes the process's peak resident memory rose above its resident memory before fn, and
    fn's result. (Linux: writing 5 to clear_refs resets the peak, VmHWM, to the current RSS.)"""
    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    # Each block over 1 MiB its own mapping, unmapped when freed (glibc would otherwise keep
    # freed blocks for reuse, and a second tensor could then go unseen in the peak).
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, MIB)  # M_MMAP_THRESHOLD (setting it also stops glibc from raising it)
    libc.mallopt(-1, MIB)  # M_TRIM_THRESHOLD
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    result = fn()
    return status("VmHWM") - before, result


def _memory(hf_dir: str) -> dict:
    import torch
    import transformers

    from megatron_patch import api
    from megatron_patch.convert import hf_io

    config = transformers.LlamaConfig(
        vocab_size=LARGE_VOCAB, hidden_size=HIDDEN, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(hf_dir, max_shard_size="2MB")
    api.initialize_parallel(1, 1)
    reader = hf_io.HFCheckpointReader(hf_dir)
    files = reader.files
    # From the headers: reading the tensors would leave freed memory for the load to reuse.
    largest = max(torch.Size(reader.shape(n)).numel() * reader.dtype(n).itemsize
                  for n in reader.names())
    reader.close()
    (model,) = api.build_model(hf_dir)
    load_peak, _ = _peak_rss_of(lambda: api.load_hf_weights([model], hf_dir))

    def export() -> int:
        count = 0
        for _, tensor in api.export_hf_weights([model]):
            count += tensor.numel()
            del tensor
        return count

    export_peak, exported = _peak_rss_of(export)
    return {"files": files, "largest": largest, "load_peak": load_peak,
            "export_peak": export_peak, "exported": exported,
            "parameters": sum(p.numel() for p in model.parameters())}


def test_memory_stays_within_one_tensor(tmp_path):
    """Loading a several-shard model in memory and exporting it hold one tensor at a time: the
    peak resident memory rises by at most the largest tensor plus MEMORY_SLACK."""
    (report,) = harness.run(_memory, 1, str(tmp_path / "hf"))
    assert len(report["files"]) >= 3, report
    assert report["largest"] == LARGE_VOCAB * HIDDEN * 4
    # Every parameter once (the embedding is tied), less the rows padding the vocabulary to
    # a multiple of 128.
    assert report["exported"] == report["parameters"] - (32768 - LARGE_VOCAB) * HIDDEN
    bound = report["largest"] + MEMORY_SLACK
    print(report)
    assert report["load_peak"] < bound, report
    assert report["export_peak"] < bound, report


def test_api_names_are_the_package_attributes():
    """`megatron_patch.X` for every name of the API, without importing torch for other names."""
    import megatron_patch
    from megatron_patch import api

    assert megatron_patch._API == set(api.__all__)
    assert all(getattr(megatron_patch, name) is getattr(api, name) for name in api.__all__)
    with pytest.raises(AttributeError):
        megatron_patch.no_such_name  # noqa: B018


def _megatron_lm_provider(root: str, other_hf_dir: str) -> dict:
    """Megatron-LM's side of model_provider: its global args (get_args) and how get_model calls
    the provider, with parallel state already set up (TP=2, sequence parallel)."""
    import types

    import torch

    from megatron_patch import api
    from megatron_patch.forward import forward_logits

    hf_dir, ckpt = os.path.join(root, "hf"), os.path.join(root, "mcore")
    tokens = torch.load(os.path.join(root, "reference.pt"))["tokens"]
    args = types.SimpleNamespace(
        tensor_model_parallel_size=2, pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None, sequence_parallel=True,
        params_dtype=torch.float32, bf16=False, fp16=False, transformer_impl="local",
        make_vocab_size_divisible_by=128, padded_vocab_size=1024, num_layers=4, hidden_size=64,
        num_attention_heads=4, ffn_hidden_size=None, hf_config=hf_dir)
    training = types.ModuleType("megatron.training")
    training.get_args = lambda: args
    sys.modules["megatron.training"] = training
    api.initialize_parallel(2, 1)
    model = api.model_provider(pre_process=True, post_process=True)
    result = {"type": type(model).__name__, "tp": model.config.tensor_model_parallel_size,
              "sp": model.config.sequence_parallel,
              "embedding_rows": model.embedding.word_embeddings.weight.shape[0]}
    api.load_hf_weights(model, hf_dir)
    loaded, meta = api.from_checkpoint(ckpt, sequence_parallel=True)
    for m in (model, loaded):
        m.eval()
    ours = forward_logits([model], tokens, meta.vocab_size)
    theirs = forward_logits([loaded], tokens, meta.vocab_size)
    result["same_logits"] = _same_bits(ours["logits"], theirs["logits"])
    try:  # another family's files
        api.load_hf_weights(model, other_hf_dir)
    except ValueError as e:
        result["wrong_files"] = str(e)
    args.num_layers = 3
    try:
        api.model_provider(pre_process=True, post_process=True)
    except ValueError as e:
        result["wrong_layers"] = str(e)
    return result


def test_model_provider_as_megatron_lm_calls_it(zoo_models):
    """At TP=2 with sequence parallelism, as Megatron-LM's get_model calls it: the family's
    GPTModel at Megatron-LM's padded vocabulary, computing the converted model's logits; flags
    that disagree with the HF config, and another model's files, are refused."""
    result, _ = harness.run(_megatron_lm_provider, 2, zoo_models["qwen2"],
                            os.path.join(zoo_models["qwen3"], "hf"))
    assert result["type"] == "GPTModel" and result["tp"] == 2 and result["sp"], result
    assert result["embedding_rows"] == 1024 // 2, result  # Megatron-LM's padded vocab, split
    assert result["same_logits"], result
    assert "--num-layers 3 (the HF config says 4)" in result["wrong_layers"], result
    # Loading another model's files is refused, naming the tensors.
    assert "model.layers.0.self_attn.q_norm.weight" in result["wrong_files"], result


def _check_example_outputs(hf_dir: str, exported: str, ckpt: str, text_file: str) -> dict:
    """The exported model (read by transformers) against the one it started from, on the text it
    was trained on; and the checkpoint it saved against the export."""
    import torch
    import transformers

    from megatron_patch import api
    from megatron_patch.convert import hf_io

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    with open(text_file) as f:
        ids = torch.tensor([tokenizer(f.read())["input_ids"][:128]])
    losses = {}
    for name, path in (("before", hf_dir), ("after", exported)):
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            losses[name] = model(input_ids=ids, labels=ids).loss.item()
    api.initialize_parallel(1, 1)
    model, _ = api.from_checkpoint(ckpt)
    reader = hf_io.HFCheckpointReader(exported)
    differ = [n for n, t in api.export_hf_weights(model) if not _same_bits(t, reader.read(n))]
    reader.close()
    return {**losses, "checkpoint_differs_from_export": differ}


def test_custom_training_example(zoo_models, tmp_path):
    """examples/custom_training/train.py under torchrun at TP=2: its loss falls, the model it
    exports is the trained one (lower loss under transformers), and its checkpoint holds the
    same weights."""
    from megatron_patch import tiny

    hf_dir = os.path.join(zoo_models["qwen2"], "hf")
    text_file = str(tmp_path / "corpus.txt")
    with open(text_file, "w") as f:
        f.write("\n".join(tiny.CORPUS))
    ckpt, exported = str(tmp_path / "ckpt"), str(tmp_path / "exported")
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = harness.run_command(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         os.path.join(REPO, "examples", "custom_training", "train.py"), "--hf-dir", hf_dir,
         "--text-file", text_file, "--tp", "2", "--steps", "6", "--save", ckpt,
         "--export", exported], env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"^step \d+ loss (\S+)$", proc.stdout, re.M)]
    assert len(losses) == 6, proc.stdout
    harness.report_learning("custom training example", drop=losses[0] - losses[-1])
    # The example takes no seed (the corpus in order, from the HF weights), so only one run was
    # measured: a drop of 0.556 over its 6 steps. Bar: 0.1 (0.18 of it).
    assert losses[-1] < losses[0] - 0.1, losses
    (check,) = harness.run(_check_example_outputs, 1, hf_dir, exported, ckpt, text_file)
    assert check["after"] < check["before"] - 0.1, check
    assert not check["checkpoint_differs_from_export"], check

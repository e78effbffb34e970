"""GPU checks the CPU test suite cannot make: CUDA/NCCL, bf16, and training speed on a GPU.

One process, one GPU (it also runs on CPU, as a dry run). Prints one JSON report:
- fp32 logits of a converted model against transformers on the same device (TF32 off);
- bf16 logits (checkpoint converted to bf16) against transformers in bf16 and in fp32;
- greedy generation against transformers' generate, token for token;
- a bf16 training run through the Trainer: first/last loss, tokens/s;
- the same run with --use-flash-attn: the attention the startup log names, the CUDA kernels
  that ran (a profiled step: their names must contain "flash"), and the loss against the run
  without the flag;
- an export of the trained checkpoint loaded by transformers.
Not part of CI.

    python benchmarks/gpu_check.py [--hidden-size 256 --train-iters 30]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time


def _dataset(prefix: str, vocab: int, num_docs: int = 400) -> None:
    """Documents that repeat a short random motif: a loss that must fall within a few steps."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for _ in range(num_docs):
        motif = rng.integers(3, vocab, size=rng.integers(3, 7))
        builder.add_document(np.concatenate([np.tile(motif, 40), [2]]).astype(np.int32), [1])
    builder.finalize(prefix + ".idx")


def _flash_check(train_args, default_losses: list[float]) -> dict:
    """--use-flash-attn on this GPU: what the startup log names, which kernels run, the loss."""
    import logging

    import torch

    from megatron_patch.training.loop import Trainer

    class Lines(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(record.getMessage())

    lines = Lines()
    logger = logging.getLogger("megatron_patch.train")
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    flash_args = copy.copy(train_args)
    flash_args.use_flash_attn, flash_args.save = True, None
    trainer = Trainer(flash_args)
    start = time.perf_counter()
    steps = trainer.train()
    seconds = time.perf_counter() - start
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        trainer.train_step()
        torch.cuda.synchronize()
    logger.removeHandler(lines)
    kernels = sorted({e.key for e in prof.key_averages() if "flash" in e.key.lower()
                      or "fmha" in e.key.lower() or "attention" in e.key.lower()})
    losses = [s["loss"] for s in steps]
    selected = [line for line in lines.lines if "--use-flash-attn" in line]
    return {"startup_log": selected, "kernels": kernels,
            "flash_kernel_ran": any("flash" in k.lower() for k in kernels),
            "log_names_flash": any("flash" in line.lower() for line in selected),
            "last_loss": losses[-1],
            "max_loss_diff_vs_default": max(abs(a - b) for a, b in
                                            zip(losses, default_losses, strict=True)),
            "tokens_per_s": len(losses) * 16 * flash_args.seq_length / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--train-iters", type=int, default=30)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--variant", default="llama2")
    args = parser.parse_args()

    import torch
    import transformers

    from megatron_patch import parallel, tiny
    from megatron_patch.convert.hf_megatron import hf_to_megatron, megatron_to_hf
    from megatron_patch.forward import forward_logits
    from megatron_patch.generation import generate
    from megatron_patch.models import from_checkpoint
    from megatron_patch.training.arguments import parse_args
    from megatron_patch.training.loop import Trainer

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "torch": torch.__version__}
    work = tempfile.mkdtemp(prefix="gpu_check_")
    hf_dir = os.path.join(work, "hf")
    tiny.COMMON.update(hidden_size=args.hidden_size, intermediate_size=args.hidden_size * 3,
                       num_attention_heads=max(4, args.hidden_size // 64))
    tiny.make_hf_model(hf_dir, args.variant)
    fp32_ckpt, bf16_ckpt = os.path.join(work, "mcore"), os.path.join(work, "mcore_bf16")
    hf_to_megatron(hf_dir, fp32_ckpt)
    hf_to_megatron(hf_dir, bf16_ckpt, params_dtype=torch.bfloat16)

    parallel.initialize(1, 1)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1000, (4, 128), generator=gen).to(device)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    hf = hf.to(device).eval()
    with torch.no_grad():
        ref32 = hf(input_ids=tokens).logits.float()
        ref16 = copy.deepcopy(hf).to(torch.bfloat16)(input_ids=tokens).logits.float()

    for name, ckpt, refs in (("fp32", fp32_ckpt, {"hf_fp32": ref32}),
                             ("bf16", bf16_ckpt, {"hf_bf16": ref16, "hf_fp32": ref32})):
        model, meta = from_checkpoint(ckpt)
        model.eval()
        out = forward_logits([model], tokens, meta.vocab_size)
        logits = out["logits"].float()
        report[f"logits_{name}"] = {
            against: {"max_abs": (logits - ref).abs().max().item(),
                      "argmax_agree": (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()}
            for against, ref in refs.items()}
        if name == "fp32":
            prompts = [tokens[0, :n].tolist() for n in (5, 17, 40)]
            ours = generate(model, prompts, max_new_tokens=24, vocab_size=meta.vocab_size,
                            eos_token_ids=[2], pad_token_id=0)
            theirs = []
            for p in prompts:
                ids = torch.tensor([p], device=device)
                out_ids = hf.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=2,
                                      pad_token_id=0)
                theirs.append(out_ids[0, len(p):].tolist())
            report["greedy_generation_identical"] = ours == theirs
            if ours != theirs:
                report["greedy_generation"] = {"ours": ours, "transformers": theirs}
        del model
    del hf

    data = os.path.join(work, "data")
    _dataset(data, 1000)
    save = os.path.join(work, "trained")
    train_args = parse_args([
        "--load", fp32_ckpt, "--data-path", data, "--split", "98,2,0", "--seq-length",
        str(args.seq_length), "--micro-batch-size", "8", "--global-batch-size", "16",
        "--train-iters", str(args.train_iters), "--lr", "1e-3", "--min-lr", "1e-4",
        "--lr-warmup-iters", "3", "--eval-interval", "1000", "--log-interval", "10", "--bf16",
        "--save", save, "--save-interval", str(args.train_iters)])
    trainer = Trainer(train_args)
    start = time.perf_counter()
    steps = trainer.train()
    seconds = time.perf_counter() - start
    losses = [s["loss"] for s in steps]
    report["train_bf16"] = {"first_loss": losses[0], "last_loss": losses[-1],
                            "tokens_per_s": len(losses) * 16 * args.seq_length / seconds}
    report["flash_attn"] = _flash_check(train_args, losses)
    parallel.destroy()
    exported = os.path.join(work, "exported")
    megatron_to_hf(save, exported)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported)
    report["export_loads_in_transformers"] = sum(p.numel() for p in reloaded.parameters())
    print("GPU_CHECK " + json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

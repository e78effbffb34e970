"""Every model-zoo test case (tests/zoo/) on one GPU: fp32 and bf16 logits against its oracle.

The CPU test suite checks each family at several parallel layouts; this runs the same cases,
oracles and conversions on a GPU (TP=PP=1, NCCL, CUDA kernels), where the custom pieces (NormHead,
ALiBi, parallel attention, MoE, DeepSeek's MLA and routing, Gemma's post-norms, soft-capping and
local RoPE, GPT-OSS's attention sinks, biased experts and clamped SwiGLU, ...) meet CUDA
tensors. Prints one JSON line per case and a summary. Not part of CI.

    python benchmarks/gpu_zoo_check.py [-k substring]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

FP32_ATOL = 1e-4  # as on CPU, with TF32 off
BF16_ARGMAX = 0.9  # bf16 rounding flips near-ties of random tiny models; most must agree


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only cases whose name contains this")
    args = parser.parse_args()

    import torch
    from zoo import CASES, prepare

    from megatron_patch import cpu_mode, parallel
    from megatron_patch.forward import forward_logits
    from megatron_patch.models import from_checkpoint

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    names = [n for n in CASES if args.k in n]
    root = tempfile.mkdtemp(prefix="gpu_zoo_")
    prepare(root, names)
    parallel.initialize(1, 1)
    device = cpu_mode.device()
    failures = []
    for name in names:
        ref = torch.load(os.path.join(root, name, "reference.pt"))
        tokens, expected = ref["tokens"].to(device), ref["logits"].to(device)
        result: dict = {"case": name, "device": str(device)}
        try:
            for dtype in (torch.float32, torch.bfloat16):
                model, meta = from_checkpoint(os.path.join(root, name, "mcore"),
                                              params_dtype=dtype)
                model.eval()
                logits = forward_logits([model], tokens, meta.vocab_size)["logits"].float()
                key = str(dtype).removeprefix("torch.")
                result[key] = {"max_abs": (logits - expected).abs().max().item(),
                               "argmax_agree": (logits.argmax(-1) == expected.argmax(-1))
                               .float().mean().item()}
                del model
            ok = (result["float32"]["max_abs"] <= FP32_ATOL
                  and result["bfloat16"]["argmax_agree"] >= BF16_ARGMAX)
        except Exception as e:  # report every case, then fail
            result["error"] = f"{type(e).__name__}: {e}"
            ok = False
        result["ok"] = ok
        if not ok:
            failures.append(name)
        print("ZOO " + json.dumps(result), flush=True)
    print(f"ZOO_SUMMARY {len(names) - len(failures)}/{len(names)} cases pass; "
          f"failing: {failures}", flush=True)
    parallel.destroy()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

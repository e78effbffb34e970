"""Benchmark HF <-> Megatron-Core checkpoint conversion against a plain safetensors copy.

Not part of the test suite. It synthesises a random Llama-shaped fp16 Hugging Face checkpoint,
then runs each step in its own fresh Python process, so that every step's peak RSS is its own:

    generate        write the synthetic HF checkpoint (not measured against a target)
    baseline        read every tensor of every shard and write the same bytes back as safetensors
    baseline_fsync  the same, then fsync each file (information only: Megatron-Core's checkpoint
                    writer, which training saves use, fsyncs; conversion does not)
    hf_to_megatron  megatron_patch.convert.hf_megatron.hf_to_megatron(hf_dir, ckpt_dir)
    megatron_to_hf  megatron_patch.convert.hf_megatron.megatron_to_hf(ckpt_dir, out_dir)

Targets: each conversion moves the model's bytes at >= 0.8x the `baseline` copy's rate, and
peaks at <= the largest input shard + 1 GiB of RSS. Each step runs --repeat times (whole rounds);
the table shows its best time and worst peak RSS. A final line holds every number as JSON.

    python benchmarks/convert_bench.py                 # ~1B parameters
    python benchmarks/convert_bench.py --params 1e8    # quick
    python benchmarks/convert_bench.py --check         # exit 1 when a target is missed

Memory: this VM hands memory that the guest has freed back to the hypervisor a few seconds
later (virtio-balloon free page reporting; the kernel also runs DAMON), and a page used again
after that costs a fault in the host. Writing 1.8 GB took 0.42-0.66 s right after another
1.8 GB file was deleted, 1.4-2.9 s three seconds later and 3.7-4.2 s ten seconds later. A
step's imports take 2 s (the copy) to 10 s (the conversions), so which step found warm memory
depended on the order of the steps and on what the one before had deleted, by up to 4x. So
every step, after its imports and just before the clock starts, deletes its own previous output
and has a short-lived process write and free twice the model's bytes (its RSS is not this
step's): every step then starts from the same warm state. On a machine without free page
reporting this changes nothing.

Measured on the 2-core development VM (1B fp16, one 1.84 GiB shard, best of 3 rounds):

    session 2  hf_to_megatron 0.43-0.59x, megatron_to_hf 0.11-0.23x (Megatron-Core's writer
               with fsync and CRC-32; its loader copying every chunk twice)
    session 3  hf_to_megatron 0.62-0.92x, megatron_to_hf 0.44-0.64x, in other full runs both
               0.2-0.4x (memory not yet warmed, see above). Peak RSS 0.62 GiB over the shard.
    session 4  (unchanged tensors and gathered rows copied from the input files, file_regions;
               memory warmed) hf_to_megatron 0.90x and 1.01x, megatron_to_hf 1.18x and 1.15x in
               two full runs, the copy taking 0.86-0.88 s; steps vary by about 1.5x between
               rounds. Peak RSS 0.43 GiB in all, 1.41 GiB under the shard. (A third run
               with --check: 0.94x and 1.27x.) Smaller models fare worse against the copy:
               each conversion has ~0.1-0.2 s of fixed work (the schema model, DCP's plan),
               so at --params 3e8 (0.6 GB in 200 MB shards) the copy took 0.21-1.1 s, the
               import 0.39-1.3 s and the export 0.29-0.78 s.

The parent process never imports torch: a child started from a large parent would inherit its
peak RSS (Linux carries ru_maxrss across fork and exec), so the parent stays small.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

# transformers 5.x: PreTrainedModel.save_pretrained(max_shard_size="50GB") (it was "5GB" in 4.x),
# split with huggingface_hub's decimal units, so a ~1B fp16 model is a single model.safetensors.
DEFAULT_MAX_SHARD_SIZE = "50GB"
VOCAB_SIZE = 32000
FP16_BYTES = 2
GIB = 2**30
THROUGHPUT_TARGET = 0.8  # conversion bytes/s as a fraction of the plain copy's
RSS_HEADROOM_TARGET = GIB  # allowed peak RSS above the largest input shard
# Llama-family models keep hidden_size / num_layers near 100 (TinyLlama 2048/22, Llama-2-7B
# 4096/32); picking the width closest to that ratio gives realistic tensor sizes for any --params.
ASPECT_RATIO = 100.0
STEPS = ("baseline", "baseline_fsync", "hf_to_megatron", "megatron_to_hf")
CONVERSIONS = ("hf_to_megatron", "megatron_to_hf")


# ---------------------------------------------------------------- model shape and tensor plan

def head_dim_for(hidden: int) -> int:
    return 128 if hidden > 2048 and hidden % 128 == 0 else 64


def kv_heads_for(heads: int) -> int:
    """GQA with about 4 query heads per KV head (TinyLlama has 32/4, Llama-3-8B 32/8); the KV
    head count must divide the query head count."""
    return max([d for d in range(1, max(1, heads // 4) + 1) if heads % d == 0])


def ffn_size(hidden: int) -> int:
    # Llama's SwiGLU width: 2/3 of 4h, rounded up to a multiple of 256 (2048 -> 5632).
    return 256 * math.ceil(8 * hidden / 3 / 256)


def llama_shape(hidden: int, layers: int) -> dict[str, int]:
    heads = hidden // head_dim_for(hidden)
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": ffn_size(hidden),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads_for(heads),
        "head_dim": head_dim_for(hidden),
        "vocab_size": VOCAB_SIZE,
    }


def tensor_plan(shape: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) in the order LlamaForCausalLM.state_dict() lists them (untied lm_head)."""
    h, ffn = shape["hidden_size"], shape["intermediate_size"]
    q_out = shape["num_attention_heads"] * shape["head_dim"]
    kv_out = shape["num_key_value_heads"] * shape["head_dim"]
    plan: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB_SIZE, h))]
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        plan += [
            (p + "self_attn.q_proj.weight", (q_out, h)),
            (p + "self_attn.k_proj.weight", (kv_out, h)),
            (p + "self_attn.v_proj.weight", (kv_out, h)),
            (p + "self_attn.o_proj.weight", (h, q_out)),
            (p + "mlp.gate_proj.weight", (ffn, h)),
            (p + "mlp.up_proj.weight", (ffn, h)),
            (p + "mlp.down_proj.weight", (h, ffn)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    plan += [("model.norm.weight", (h,)), ("lm_head.weight", (VOCAB_SIZE, h))]
    return plan


def num_params(shape: dict[str, int]) -> int:
    return sum(math.prod(s) for _, s in tensor_plan(shape))


def choose_shape(params: float, hidden: int | None, layers: int | None) -> dict[str, int]:
    """A Llama shape of about `params` parameters; explicit hidden size / layers win."""
    if hidden is not None and layers is not None:
        return llama_shape(hidden, layers)

    def layers_for(h: int) -> int:
        fixed = num_params(llama_shape(h, 0))
        per_layer = num_params(llama_shape(h, 1)) - fixed
        return max(1, round((params - fixed) / per_layer))

    if hidden is not None:
        return llama_shape(hidden, layers_for(hidden))
    candidates = range(256, 16384 + 1, 256)
    if layers is not None:
        return llama_shape(min(candidates, key=lambda h: abs(num_params(llama_shape(h, layers))
                                                               - params)), layers)
    return llama_shape(*min(((h, layers_for(h)) for h in candidates),
                            key=lambda hl: abs(math.log(hl[0] / hl[1] / ASPECT_RATIO))
                            + abs(math.log(num_params(llama_shape(*hl)) / params))))


def parse_size(size: str) -> int:
    """'50GB' -> 50 * 10**9: decimal units, as huggingface_hub reads max_shard_size."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)?\s*", size.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"cannot read size {size!r}; use e.g. 50GB or 500MB")
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    return int(float(match.group(1)) * units[match.group(2) or "B"])


def split_shards(plan: list[tuple[str, tuple[int, ...]]],
                 max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Group tensors into shards the way huggingface_hub.split_torch_state_dict_into_shards does:
    in state-dict order, a new shard when the next tensor would overflow, and a tensor larger
    than the limit alone in a shard of its own."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = []
    current: list[tuple[str, tuple[int, ...]]] = []
    current_bytes = 0
    for name, shape in plan:
        size = math.prod(shape) * FP16_BYTES
        if size > max_shard_bytes:
            shards.append([(name, shape)])
            continue
        if current_bytes + size > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append((name, shape))
        current_bytes += size
    if current:
        shards.append(current)
    return shards


# ---------------------------------------------------------------- child steps (import torch)

def write_random_safetensors(path: str, tensors: list[tuple[str, tuple[int, ...]]]) -> None:
    """Stream one safetensors file: the header first, then each tensor as it is generated, so
    no more than one tensor is ever in memory. Data is laid out sorted by name, as
    safetensors.torch.save_file does for tensors of one dtype."""
    import torch

    ordered = sorted(tensors)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in ordered:
        size = math.prod(shape) * FP16_BYTES
        header[name] = {"dtype": "F16", "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header so that data is 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, shape in ordered:
            f.write(torch.randn(shape, dtype=torch.float16).numpy().data)


def generate(hf_dir: str, shape: dict[str, int], max_shard_bytes: int) -> None:
    """Write what LlamaForCausalLM.save_pretrained would write for this shape, in fp16."""
    import torch
    import transformers
    from safetensors import safe_open

    torch.manual_seed(0)
    os.makedirs(hf_dir, exist_ok=True)
    config = transformers.LlamaConfig(**shape, tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float16  # written as "dtype": "float16" (transformers 4.x: torch_dtype)
    config.save_pretrained(hf_dir)
    transformers.GenerationConfig.from_model_config(config).save_pretrained(hf_dir)

    plan = tensor_plan(shape)
    shards = split_shards(plan, max_shard_bytes)
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, tensors in zip(names, shards, strict=True):
        write_random_safetensors(os.path.join(hf_dir, name), tensors)
        with safe_open(os.path.join(hf_dir, name), framework="pt") as f:  # the format is right
            assert sorted(f.keys()) == sorted(n for n, _ in tensors), name
    if len(shards) > 1:
        index = {
            "metadata": {"total_parameters": num_params(shape),
                         "total_size": num_params(shape) * FP16_BYTES},
            "weight_map": {n: file for file, tensors in zip(names, shards, strict=True)
                           for n, _ in tensors},
        }
        with open(os.path.join(hf_dir, "model.safetensors.index.json"), "w") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")


def plain_copy(src: str, dst: str, fsync: bool = False) -> None:
    """The baseline: load each shard's tensors and save them again under the same file name.
    (safetensors' get_tensor maps the file rather than copying it, as a conversion may too.)"""
    from safetensors import safe_open
    from safetensors.torch import save_file

    os.makedirs(dst, exist_ok=True)
    for name in sorted(os.listdir(src)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(src, name), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
                metadata = f.metadata()
            save_file(tensors, os.path.join(dst, name), metadata=metadata)
            del tensors
            if fsync:
                with open(os.path.join(dst, name), "rb") as f:
                    os.fsync(f.fileno())
        else:
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def warm_free_memory(nbytes: int) -> None:
    """Touch `nbytes` of fresh memory and free it again, so that the step's own allocations
    (page cache for what it writes) find recently used pages, whatever ran before it. Done
    in a short-lived process of its own, which leaves this one's peak RSS alone. Capped at
    half the available memory."""
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f
                         if line.startswith("MemAvailable:"))
    nbytes = min(nbytes, available // 2)
    if nbytes > 0:  # repeating a byte writes every page (bytes(n) would leave them unmapped)
        subprocess.run([sys.executable, "-c", f"b'x' * {nbytes}"], check=True)


def rss_now_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(step: str, spec: dict[str, Any]) -> None:
    """Run one step in this fresh process and write its numbers to spec['result']."""
    # Imports happen before the clock starts: only the work itself is timed.
    import torch  # noqa: F401

    if step in CONVERSIONS:
        # Also the modules the conversion would otherwise import lazily on first use.
        # (transformers resolves LlamaForCausalLM lazily, on first attribute access.)
        from megatron.core import dist_checkpointing  # noqa: F401
        from megatron.core.models import gpt  # noqa: F401
        from transformers import LlamaForCausalLM  # noqa: F401

        from megatron_patch.convert import hf_megatron
        from megatron_patch.models import layers  # noqa: F401
    calls = {
        "generate": lambda: generate(spec["hf_dir"], spec["shape"], spec["max_shard_bytes"]),
        "baseline": lambda: plain_copy(spec["hf_dir"], spec["copy_dir"]),
        "baseline_fsync": lambda: plain_copy(spec["hf_dir"], spec["copy_dir"], fsync=True),
        "hf_to_megatron": lambda: hf_megatron.hf_to_megatron(spec["hf_dir"], spec["ckpt_dir"]),
        "megatron_to_hf": lambda: hf_megatron.megatron_to_hf(spec["ckpt_dir"], spec["out_dir"],
                                                             max_shard_size=spec["max_shard_bytes"]),
    }
    # Only now, after the imports, just before the clock starts: the previous round's output
    # goes, and memory is warmed (see "Memory" in the module docstring).
    for path in spec.get("remove", []):
        shutil.rmtree(path, ignore_errors=True)
    os.sync()
    warm_free_memory(spec.get("warm_bytes", 0))
    rss_before = rss_now_bytes()
    profiler = None
    if spec.get("profile_dir"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    start = time.perf_counter()
    calls[step]()
    seconds = time.perf_counter() - start
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(os.path.join(spec["profile_dir"], f"{step}.prof"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    with open(spec["result"], "w") as f:
        json.dump({"seconds": seconds, "peak_rss": peak, "rss_before": rss_before}, f)


# ---------------------------------------------------------------- parent (no torch)

def run_step(step: str, spec: dict[str, Any], workdir: str, threads: int) -> dict[str, Any]:
    """Run `step` in a fresh interpreter; its output goes to a log file, shown on failure."""
    spec = dict(spec, result=os.path.join(workdir, f"{step}.result.json"))
    log_path = os.path.join(workdir, f"{step}.log")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    # Start each step with no dirty pages left over from the previous one's writes.
    os.sync()
    print(f"  {step} ...", end="", flush=True)
    with open(log_path, "w") as log:
        command = [sys.executable, os.path.abspath(__file__), "_child", step, json.dumps(spec)]
        proc = subprocess.run(command, check=False, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        with open(log_path) as f:
            sys.stderr.write(f.read()[-6000:])
        raise SystemExit(f"step {step} failed with exit status {proc.returncode} (log {log_path})")
    with open(spec["result"]) as f:
        result = json.load(f)
    print(f" {result['seconds']:.1f} s, peak RSS {result['peak_rss'] / GIB:.2f} GiB", flush=True)
    return result


def safetensors_index(directory: str) -> dict[str, tuple[str, str, list[int], int, int]]:
    """name -> (file, dtype, shape, start, end) of every tensor, from the files' headers."""
    index = {}
    for file in sorted(n for n in os.listdir(directory) if n.endswith(".safetensors")):
        path = os.path.join(directory, file)
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        for name, info in header.items():
            start, end = (8 + header_len + o for o in info["data_offsets"])
            index[name] = (path, info["dtype"], info["shape"], start, end)
    return index


def same_tensors(original: str, exported: str) -> bool:
    """Whether the round trip gave back every tensor with the same dtype, shape and bytes (a fast
    conversion that wrote something else would make the benchmark meaningless). Files are not
    compared: the exporter may order and shard tensors differently."""
    a, b = safetensors_index(original), safetensors_index(exported)
    if a.keys() != b.keys():
        return False
    for name, (path_a, dtype_a, shape_a, start_a, end_a) in a.items():
        path_b, dtype_b, shape_b, start_b, end_b = b[name]
        if (dtype_a, shape_a, end_a - start_a) != (dtype_b, shape_b, end_b - start_b):
            return False
        with open(path_a, "rb") as fa, open(path_b, "rb") as fb:
            fa.seek(start_a)
            fb.seek(start_b)
            if fa.read(end_a - start_a) != fb.read(end_b - start_b):
                return False
    return True


def report(shape: dict[str, int], model_bytes: int, largest_shard: int, n_shards: int,
           results: dict[str, dict[str, Any]], threads: int, identical: bool,
           load: list[float]) -> bool:
    """Print the table and the targets; True when every target is met."""
    base_rate = model_bytes / results["baseline"]["seconds"]
    fsync_rate = model_bytes / results["baseline_fsync"]["seconds"]
    print(f"\nmodel: {num_params(shape) / 1e9:.3f} B params, hidden {shape['hidden_size']}, "
          f"{shape['num_hidden_layers']} layers, ffn {shape['intermediate_size']}, heads "
          f"{shape['num_attention_heads']}/{shape['num_key_value_heads']} kv, fp16 "
          f"{model_bytes / GIB:.2f} GiB in {n_shards} shard(s), largest "
          f"{largest_shard / GIB:.2f} GiB; OMP_NUM_THREADS={threads}")
    # Other work on the machine makes the times noisy; say how busy it was.
    print(f"load average (1 min) before / after: {load[0]:.2f} / {load[1]:.2f} on "
          f"{os.cpu_count()} CPUs")
    print(f"\n{'step':<16}{'seconds':>9}{'MB/s':>9}{'x copy':>8}{'x fsync':>8}{'RSS start':>11}"
          f"{'peak RSS':>10}{'- shard':>9}  (RSS in GiB)")
    ok = True
    verdicts = []
    for step in STEPS:
        r = results[step]
        rate = model_bytes / r["seconds"]
        r.update(bytes_per_s=rate, throughput_ratio=rate / base_rate,
                 throughput_ratio_to_fsync_copy=rate / fsync_rate,
                 rss_over_largest_shard=r["peak_rss"] - largest_shard)
        print(f"{step:<16}{r['seconds']:>9.2f}{rate / 1e6:>9.0f}{r['throughput_ratio']:>8.2f}"
              f"{r['throughput_ratio_to_fsync_copy']:>8.2f}{r['rss_before'] / GIB:>11.2f}"
              f"{r['peak_rss'] / GIB:>10.2f}{r['rss_over_largest_shard'] / GIB:>9.2f}")
        if step not in CONVERSIONS:
            continue
        fast = r["throughput_ratio"] >= THROUGHPUT_TARGET
        lean = r["rss_over_largest_shard"] <= RSS_HEADROOM_TARGET
        r.update(throughput_pass=fast, rss_pass=lean)
        ok = ok and fast and lean
        verdicts.append(f"{step:<16}throughput {r['throughput_ratio']:.2f}x copy "
                        f"(target >= {THROUGHPUT_TARGET}x): {'PASS' if fast else 'FAIL'}")
        verdicts.append(f"{step:<16}peak RSS - largest shard "
                        f"{r['rss_over_largest_shard'] / GIB:.2f} GiB "
                        f"(target <= {RSS_HEADROOM_TARGET / GIB:.0f} GiB): "
                        f"{'PASS' if lean else 'FAIL'}")
    print("\n" + "\n".join(verdicts))
    print(f"round trip HF -> Megatron -> HF gives back the same tensors: {identical}")
    print(json.dumps({"shape": shape, "params": num_params(shape), "model_bytes": model_bytes,
                      "shards": n_shards, "largest_shard_bytes": largest_shard,
                      "omp_num_threads": threads, "load_average_before_after": load,
                      "round_trip_same_tensors": identical,
                      "steps": results, "all_targets_met": ok}))
    return ok


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--params", type=float, default=1e9,
                        help="approximate parameter count of the synthetic Llama model")
    parser.add_argument("--hidden-size", type=int, help="override the chosen hidden size "
                        "(a multiple of 64)")
    parser.add_argument("--num-layers", type=int, help="override the chosen number of layers")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                        help="shard limit for the synthetic checkpoint and the exported one "
                        "(decimal units; transformers 5.x save_pretrained's default)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="OMP_NUM_THREADS for every step (one process per step, so all "
                        "cores by default)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of the measured steps; the table shows each step's "
                        "best time and worst peak RSS")
    parser.add_argument("--workdir", help="directory for the checkpoints (a fresh temporary "
                        "directory inside it is used and removed); default: the system temp dir")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and logs")
    parser.add_argument("--profile", action="store_true",
                        help="run each step under cProfile; .prof files are kept in the workdir")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    if args.hidden_size is not None and args.hidden_size % 64:
        parser.error("--hidden-size must be a multiple of 64 (the head size)")
    args.max_shard_bytes = parse_size(args.max_shard_size)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    shape = choose_shape(args.params, args.hidden_size, args.num_layers)
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="convert_bench-", dir=args.workdir)
    spec = {
        "shape": shape, "max_shard_bytes": args.max_shard_bytes,
        "hf_dir": os.path.join(workdir, "hf"), "copy_dir": os.path.join(workdir, "hf_copy"),
        "ckpt_dir": os.path.join(workdir, "megatron"), "out_dir": os.path.join(workdir, "hf_out"),
        "profile_dir": workdir if args.profile else None,
    }
    print(f"workdir {workdir}; {num_params(shape) / 1e9:.3f} B parameters, OMP_NUM_THREADS="
          f"{args.threads}")
    try:
        run_step("generate", spec, workdir, args.threads)
        shard_sizes = [os.path.getsize(os.path.join(spec["hf_dir"], n))
                       for n in os.listdir(spec["hf_dir"]) if n.endswith(".safetensors")]
        model_bytes = num_params(shape) * FP16_BYTES
        runs: dict[str, list[dict[str, Any]]] = {step: [] for step in STEPS}
        load = [os.getloadavg()[0]]
        # Whole rounds, so that any drift of the machine affects every step alike.
        for round_ in range(args.repeat):
            if args.repeat > 1:
                print(f"round {round_ + 1}/{args.repeat}")
            for step in STEPS:
                remove = [spec[key] for key in {
                    "baseline": ("copy_dir",), "baseline_fsync": ("copy_dir",),
                    "hf_to_megatron": ("ckpt_dir",), "megatron_to_hf": ("out_dir",),
                }[step]]
                runs[step].append(run_step(step, dict(spec, remove=remove,
                                                      warm_bytes=2 * model_bytes),
                                           workdir, args.threads))
        shutil.rmtree(spec["copy_dir"], ignore_errors=True)
        # Best time (the least disturbed run), worst memory.
        results = {step: {"seconds": min(r["seconds"] for r in rs),
                          "peak_rss": max(r["peak_rss"] for r in rs),
                          "rss_before": max(r["rss_before"] for r in rs),
                          "all_seconds": [r["seconds"] for r in rs]}
                   for step, rs in runs.items()}
        load.append(os.getloadavg()[0])
        identical = same_tensors(spec["hf_dir"], spec["out_dir"])
        ok = report(shape, model_bytes, max(shard_sizes), len(shard_sizes), results, args.threads,
                    identical, load)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        elif args.profile:  # keep the logs and .prof files, not the checkpoints
            for key in ("hf_dir", "copy_dir", "ckpt_dir", "out_dir"):
                shutil.rmtree(spec[key], ignore_errors=True)
            print(f"profiles and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "_child":
        child(sys.argv[2], json.loads(sys.argv[3]))
    else:
        sys.exit(main(sys.argv[1:]))

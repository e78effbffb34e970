"""Benchmark `megatron_patch.data.preprocess` against a one-document-at-a-time baseline.

Not part of the test suite. It synthesises a JSON-lines corpus (English-like and Chinese text,
documents of --mean-chars characters on average, lognormally spread), trains a byte-level BPE
tokenizer on part of it (or takes --tokenizer), then runs each step in its own fresh Python
process:

    baseline        load the tokenizer once; per line: json.loads, tokenizer.encode, append EOS,
                    IndexedDatasetBuilder.add_document; then finalize
    w1              preprocess(workers=1), tokenizers' own threads as the environment has them
    w1_single       preprocess(workers=1) with TOKENIZERS_PARALLELISM=false: one core
    w2              preprocess(workers=2)

Each step is timed from after its imports (megatron.core, transformers) to its last byte
written; tokenizer loading is included. CPU seconds (its own and its workers') are printed
too: on a shared machine, wall-clock speedups from workers need idle cores. The steps must
write byte-identical datasets. A final line holds every number as JSON.

    python benchmarks/preprocess_bench.py                # 30 MB corpus
    python benchmarks/preprocess_bench.py --mb 5         # quick
    python benchmarks/preprocess_bench.py --mean-chars 100   # short documents
    python benchmarks/preprocess_bench.py --tokenizer Llama-2-7b-hf
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("baseline", "w1", "w1_single", "w2")
TOKENIZER_VOCAB = 32000
TOKENIZER_TRAIN_MB = 4


def make_corpus(path: str, megabytes: float, mean_chars: int, seed: int = 0) -> None:
    """Zipf-distributed made-up words and common CJK characters, so BPE merges are realistic."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(20000)]
    weights = [1 / (rank + 1) for rank in range(len(words))]
    hanzi = [chr(0x4E00 + i) for i in rng.sample(range(0x5000), 3000)]
    hanzi_weights = [1 / (rank + 1) for rank in range(len(hanzi))]
    target = int(megabytes * 1e6)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            # lognormal lengths: median mean_chars / 1.4, a long tail
            n = int(min(10 * mean_chars, rng.lognormvariate(math.log(mean_chars) - 0.32, 0.8)))
            if rng.random() < 0.7:
                parts = rng.choices(words, weights, k=max(1, n // 6))
                text = " ".join(parts).capitalize() + "."
            else:
                text = "".join(rng.choices(hanzi, hanzi_weights, k=max(1, n // 3)))
                text += " " + " ".join(rng.choices(words, weights, k=10))
            line = json.dumps({"text": text, "source": "synthetic"}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))


def train_tokenizer(corpus: str, out_dir: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        seen = 0
        with open(corpus, encoding="utf-8") as f:
            for line in f:
                seen += len(line)
                if seen > TOKENIZER_TRAIN_MB * 1e6:
                    return
                yield json.loads(line)["text"]

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB,
                                  special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts(), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(out_dir)


def baseline(corpus: str, prefix: str, tokenizer: str) -> dict[str, Any]:
    """The straightforward tool: one document at a time, in one process."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from transformers import AutoTokenizer

    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(tokenizer)
    tok.model_max_length = sys.maxsize
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(len(tok)))
    docs = tokens = 0
    with open(corpus, "rb") as f:
        for line in f:
            ids = tok.encode(json.loads(line)["text"]) + [tok.eos_token_id]
            builder.add_document(np.array(ids), [len(ids)])
            docs += 1
            tokens += len(ids)
    builder.finalize(prefix + ".idx")
    return {"seconds": time.perf_counter() - start, "documents": docs, "tokens": tokens}


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the workers, once shut down)."""
    import resource

    own, children = (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                       resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_step(step: str, corpus: str, out_dir: str, tokenizer: str) -> dict[str, Any]:
    import warnings

    warnings.simplefilter("ignore")
    # Imports are not timed (megatron.core alone takes seconds): every step imports the same.
    import megatron.core.datasets.indexed_dataset  # noqa: F401
    from transformers import AutoTokenizer  # noqa: F401 (transformers imports this lazily)

    prefix = os.path.join(out_dir, step)
    cpu = _cpu_seconds()
    if step == "baseline":
        result = baseline(corpus, prefix + "_text_document", tokenizer)
    else:
        from megatron_patch.data.preprocess import preprocess

        start = time.perf_counter()
        summary = preprocess(corpus, prefix, tokenizer, workers=2 if step == "w2" else 1,
                             log_interval=0)
        result = {"seconds": time.perf_counter() - start, "documents": summary["documents"],
                  "tokens": summary["tokens"]}
    result["cpu_s"] = _cpu_seconds() - cpu
    result["bin"] = prefix + "_text_document.bin"
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=30, help="corpus size in MB (default 30)")
    parser.add_argument("--mean-chars", type=int, default=1000,
                        help="mean document length in characters (default 1000)")
    parser.add_argument("--workdir", help="keep the corpus, tokenizer and outputs here "
                                          "(reused when present)")
    parser.add_argument("--tokenizer", help="an HF tokenizer directory (default: train one)")
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.step:  # a child: one measured step, one JSON line
        if args.step == "w1_single":
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        print(json.dumps(run_step(args.step, args.corpus, args.workdir, args.tokenizer)))
        return 0

    work = args.workdir or tempfile.mkdtemp(prefix="preprocess_bench_")
    os.makedirs(work, exist_ok=True)
    corpus = os.path.join(work, f"corpus_{args.mb:g}mb_{args.mean_chars}chars.jsonl")
    if not os.path.exists(corpus):
        t = time.perf_counter()
        make_corpus(corpus, args.mb, args.mean_chars)
        print(f"corpus: {corpus} ({time.perf_counter() - t:.1f} s)", flush=True)
    tokenizer = args.tokenizer
    if tokenizer is None:
        tokenizer = os.path.join(work, "tokenizer")
        if not os.path.exists(os.path.join(tokenizer, "tokenizer.json")):
            t = time.perf_counter()
            train_tokenizer(corpus, tokenizer)
            print(f"tokenizer: byte-level BPE, vocab {TOKENIZER_VOCAB}, trained on "
                  f"{TOKENIZER_TRAIN_MB} MB ({time.perf_counter() - t:.1f} s)", flush=True)

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1")
    env.pop("TOKENIZERS_PARALLELISM", None)
    mb = os.path.getsize(corpus) / 1e6
    print(f"{mb:.1f} MB, {os.cpu_count()} CPUs, load average before: "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    for step in STEPS:
        out = subprocess.run([sys.executable, __file__, "--step", step, "--corpus", corpus,
                              "--workdir", work, "--tokenizer", tokenizer],
                             env=env, check=True, capture_output=True, text=True)
        r = results[step] = json.loads(out.stdout.strip().splitlines()[-1])
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["mb_per_s"] = mb / r["seconds"]
        r["vs_baseline"] = r["tokens_per_s"] / results["baseline"]["tokens_per_s"]
        print(f"{step:10s} {r['seconds']:6.2f} s ({r['cpu_s']:6.2f} CPU s)  {r['documents']} docs"
              f"  {r['tokens']} tokens  {r['tokens_per_s'] / 1e6:6.3f} M tokens/s  "
              f"{r['mb_per_s']:6.2f} MB/s  {r['vs_baseline']:5.2f}x baseline", flush=True)

    with open(results["baseline"]["bin"], "rb") as f:
        reference = f.read()
    for step in STEPS[1:]:
        with open(results[step]["bin"], "rb") as f:
            results[step]["same_as_baseline"] = f.read() == reference
    print("same .bin as the baseline: " + ", ".join(
        f"{s}={results[s]['same_as_baseline']}" for s in STEPS[1:]))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(json.dumps({"mb": mb, "cpus": os.cpu_count(), **{
        s: {k: v for k, v in r.items() if k != "bin"} for s, r in results.items()}}))
    return 0 if all(results[s]["same_as_baseline"] for s in STEPS[1:]) else 1


if __name__ == "__main__":
    sys.exit(main())

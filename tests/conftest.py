import os
import sys

# One thread per process: ranks share the machine's cores, and forked workers must not inherit
# a started OpenMP pool.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402
import pytest  # noqa: E402
import transformers  # noqa: E402,F401

# Import the heavy modules once, here, so forked workers start with them loaded.
import megatron_patch.convert.hf_megatron  # noqa: E402,F401
import megatron_patch.forward  # noqa: E402,F401
from megatron_patch import cpu_mode  # noqa: E402
from megatron_patch import tiny as tiny_models  # noqa: E402

# CPU mode on in the test process, before any worker is forked (entry points switch it on
# explicitly: importing megatron_patch does not).
cpu_mode.maybe_enable()

# Tests leave no process behind: the session fails otherwise (process_check.py).
pytest_plugins = ["process_check"]

TOKENS_SEED = 1234
BATCH, SEQ = 2, 32


def _prepare(root: str, variants: list[str]) -> None:
    """In a worker: save each tiny HF model, its transformers reference output, and convert it."""
    import torch

    from megatron_patch.convert.hf_megatron import hf_to_megatron

    for variant in variants:
        hf_dir = os.path.join(root, variant, "hf")
        tiny_models.make_hf_model(hf_dir, variant)
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        gen = torch.Generator().manual_seed(TOKENS_SEED)
        tokens = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=gen)
        with torch.no_grad():
            out = model(input_ids=tokens, labels=tokens)
        torch.save({"tokens": tokens, "logits": out.logits, "loss": out.loss.item()},
                   os.path.join(root, variant, "reference.pt"))
        hf_to_megatron(hf_dir, os.path.join(root, variant, "mcore"))


@pytest.fixture(scope="session")
def llama_models(tmp_path_factory) -> dict[str, str]:
    """variant -> directory holding hf/ (HF model), mcore/ (converted) and reference.pt."""
    root = str(tmp_path_factory.mktemp("llama"))
    variants = list(tiny_models.LLAMA_VARIANTS)
    harness.run(_prepare, 1, root, variants)
    return {v: os.path.join(root, v) for v in variants}


@pytest.fixture(scope="session")
def zoo_models(tmp_path_factory) -> dict[str, str]:
    """Every zoo case (tests/zoo/) -> directory holding hf/ (its original format), mcore/ (its
    conversion) and reference.pt (the oracle's logits). Shared by the zoo and API tests."""
    import zoo

    root = str(tmp_path_factory.mktemp("zoo"))
    harness.run(zoo.prepare, 1, root, list(zoo.CASES))
    return {name: os.path.join(root, name) for name in zoo.CASES}

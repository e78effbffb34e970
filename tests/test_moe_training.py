"""Training a mixture-of-experts model (Mixtral) through the Trainer, experts split over EP=2."""

import os

import harness
import pytest
from test_training import _make_dataset, _train


def _prepare_mixtral(root: str) -> None:
    import torch
    import transformers

    from megatron_patch import tiny
    from megatron_patch.convert.hf_megatron import hf_to_megatron

    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, vocab_size=1000, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=256, router_aux_loss_coef=0.01)
    hf_dir = os.path.join(root, "hf")
    transformers.MixtralForCausalLM(config).save_pretrained(hf_dir)
    tiny.train_tokenizer(hf_dir)
    hf_to_megatron(hf_dir, os.path.join(root, "mcore"))
    _make_dataset(os.path.join(root, "tokens"))


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("mixtral_train"))
    harness.run(_prepare_mixtral, 1, root)
    return root


def _ep_flags(ep: int) -> tuple:
    return ("--expert-model-parallel-size", str(ep))


def test_moe_loss_goes_down_and_ep_does_not_change_it(mixtral):
    """DP=2 with all experts on each rank vs. DP=2 with the experts split over EP=2: routing is
    dropless, so each token meets the same experts and the curves agree (fp32 reduction order
    only, 1e-5 as in test_training). The load-balancing loss (router_aux_loss_coef 0.01) trains
    along in both."""
    ckpt, data = os.path.join(mixtral, "mcore"), os.path.join(mixtral, "tokens")
    dense = harness.run(_train, 2, ckpt, data, iters=12, lr=5e-3, extra=_ep_flags(1))[0]
    split = harness.run(_train, 2, ckpt, data, iters=12, lr=5e-3, extra=_ep_flags(2))[0]
    assert sum(split[-3:]) / 3 < split[0] - 1.0, split
    diff = max(abs(a - b) for a, b in zip(dense, split, strict=True))
    assert diff <= 1e-5, (diff, dense, split)

"""A converted model computes what transformers computes, at every parallel layout.

Tolerance: fp32 on CPU. The two implementations order their floating-point reductions
differently (fused QKV matmul, vocab-parallel softmax, TP all-reduces), which moves logits by
~1e-6; 1e-4 on logits and 1e-5 on the loss (harness.LOGITS_ATOL, LOSS_ATOL) leave room for that
and nothing more.
"""


import harness
import pytest

LAYOUTS = [(1, 1, False), (2, 1, True), (1, 2, False), (2, 2, True)]


@pytest.mark.parametrize("tp,pp,sp", LAYOUTS, ids=[f"tp{t}pp{p}{'sp' if s else ''}"
                                                    for t, p, s in LAYOUTS])
def test_logits_and_loss_match_transformers(llama_models, tp, pp, sp):
    reports = harness.run(harness.checkpoint_parity, tp * pp, llama_models, tp, pp, sp, None)
    merged = {k: v for r in reports for k, v in r.items()}
    assert set(merged) == set(llama_models), f"no report for {set(llama_models) - set(merged)}"
    for variant, r in merged.items():
        assert r["max_abs"] <= harness.LOGITS_ATOL, (variant, r)
        assert r["loss_diff"] <= harness.LOSS_ATOL, (variant, r)
        assert r["argmax_agree"] == 1.0, (variant, r)

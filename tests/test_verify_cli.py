"""`megatron-patch verify` under a real torchrun launch."""

import json
import os
import sys

import harness


def _verify(hf_dir: str, ckpt_dir: str, *flags: str) -> tuple[int, dict]:
    proc = harness.run_command([sys.executable, "-m", "megatron_patch", "verify", hf_dir, ckpt_dir,
                           *flags], timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout + proc.stderr
    return proc.returncode, json.loads(lines[0])


def test_verify_passes_at_tp2_with_sp(llama_models):
    root = llama_models["llama2"]
    code, report = _verify(os.path.join(root, "hf"), os.path.join(root, "mcore"),
                           "--tp", "2", "--sp")
    assert code == 0 and report["ok"], report
    assert report["max_abs_diff"] <= 1e-4 and report["argmax_agreement"] == 1.0
    assert (report["tp"], report["pp"], report["sp"]) == (2, 1, True)


def test_verify_fails_for_a_different_model(llama_models):
    # Same shapes and weights (same seed), other rope_theta: verify must notice and exit 1.
    code, report = _verify(os.path.join(llama_models["codellama"], "hf"),
                           os.path.join(llama_models["llama2"], "mcore"))
    assert code != 0 and not report["ok"], report
    assert report["max_abs_diff"] > 1e-4


def test_verify_help_documents_every_argument(capsys):
    """Positionals and every flag (--tp/--pp/--sp/--loss-atol/--batch-size/...) say what they
    are in `verify --help`."""
    import pytest

    from megatron_patch import cli

    parser = cli.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["verify", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    (verify,) = [p for a in parser._subparsers._group_actions for n, p in a.choices.items()
                 if n == "verify"]
    for action in verify._actions:
        assert action.help, f"verify {action.option_strings or action.dest} has no help"
        assert " ".join(action.help.split()) in text, action.help

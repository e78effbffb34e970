"""RL (and the modes in rlhf/) drive the trainer through its public methods: no module in
megatron_patch/rlhf/ reads a private attribute of a `Trainer` or assigns one of its attributes
(its iteration, data, mode state). Checked on the source, by an AST walk."""

from __future__ import annotations

import ast
import pathlib

import megatron_patch

RLHF = pathlib.Path(megatron_patch.__file__).parent / "rlhf"
# The names that hold a Trainer in rlhf/: RLTrainer's actor (`self.trainer`, `t`) and critic,
# a mode's trainer (`self.trainer`), a loop variable over both (`trainer`), and RLTrainer's
# attributes reached from elsewhere (`rl.trainer`, `rl.critic`).
TRAINER_NAMES = {"trainer", "t", "actor", "critic"}
TRAINER_ATTRIBUTES = {"trainer", "actor", "critic"}


def _is_trainer(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        return node.id in TRAINER_NAMES
    return isinstance(node, ast.Attribute) and node.attr in TRAINER_ATTRIBUTES


def _assigned_trainer_attribute(target: ast.expr) -> str | None:
    """`<trainer>.x = ...`, `<trainer>.x[i] = ...`, `<trainer>.x.y = ...`: the attribute."""
    node = target
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        if isinstance(node, ast.Attribute) and _is_trainer(node.value):
            return node.attr
        node = node.value
    return None


def violations(source: str, filename: str) -> list[str]:
    """Private reads and attribute assignments on Trainer expressions, as `file:line: what`."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__") and _is_trainer(node.value)):
            found.append(f"{where}: reads {ast.unparse(node)}")
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = node.targets
        for target in targets:
            for element in (target.elts if isinstance(target, ast.Tuple) else [target]):
                if _assigned_trainer_attribute(element) is not None:
                    found.append(f"{where}: assigns {ast.unparse(element)}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("setattr", "delattr") and node.args
                and _is_trainer(node.args[0])):
            found.append(f"{where}: {ast.unparse(node)}")
    return found


def test_the_checker_finds_private_reads_and_assignments():
    """The walk itself: each kind of use it must find, and the uses it must leave alone."""
    bad = ("self.trainer._metrics()\nt.iteration += 1\nt.datasets[0] = share\n"
           "t.mode.maxima = []\nrl.critic.consumed_samples = 0\nsetattr(trainer, 'x', 1)\n")
    assert len(violations(bad, "bad.py")) == 6, violations(bad, "bad.py")
    good = ("self.trainer = Trainer(args)\nt.train_step(share)\nx = t.iteration\n"
            "self.trainer.save()\nbatch['x'] = t.vocab_size\nself._tokens = 1\n")
    assert violations(good, "good.py") == []


def test_rlhf_uses_only_the_trainers_public_seams():
    found = [v for path in sorted(RLHF.glob("*.py"))
             for v in violations(path.read_text(), path.name)]
    assert found == [], "\n".join(found)


def test_the_frozen_reference_is_made_in_one_place():
    """DPO's reference, RL's KL reference and LoRA's adapters-off reference are one
    `training.reference.FrozenReference`: no other module outside lora/ turns the adapters off
    (`lora.disabled`) or builds a frozen copy of the trainer's model (`build_module` without
    initialisation)."""
    package = pathlib.Path(megatron_patch.__file__).parent
    makers = []
    for path in sorted(package.rglob("*.py")):
        if path.parent.name == "lora" or path.name == "reference.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), path.name)):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and (node.func.attr == "disabled"
                         or (node.func.attr == "build_module"
                             and any(k.arg == "perform_initialization" for k in node.keywords)))):
                makers.append(f"{path.relative_to(package)}:{node.lineno}: "
                              f"{ast.unparse(node.func)}")
    assert makers == [], "\n".join(makers)

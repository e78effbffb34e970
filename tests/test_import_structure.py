"""Import structure of megatron_patch, read with `ast` (nothing is imported).

A module's `_private` names are its own: a helper another module needs gets a public name. The
check covers `from x import _y` and `x._y` where `x` is bound by importing a project module.
"""

import ast
import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "megatron_patch"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a (possibly relative) `from ... import` names."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_imports(source: str, path: pathlib.Path) -> list[str]:
    """'file:line: what' for each use of another project module's private name in one file's
    source (`path` places it in the package, for relative imports)."""
    tree = ast.parse(source, filename=str(path))
    module, is_package = _module_name(path), path.name == "__init__.py"
    module_aliases: set[str] = set()  # local names bound to project modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _absolute(node, module, is_package)
            if source.split(".")[0] != "megatron_patch":
                continue
            for alias in node.names:
                if _is_private(alias.name):
                    found.append(f"{path}:{node.lineno}: from {source} import {alias.name}")
                else:  # `from megatron_patch.convert import hf_megatron` may bind a module
                    module_aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "megatron_patch":
                    module_aliases.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in module_aliases:
                found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_imports_another_modules_private_names():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50, f"found only {len(files)} modules under {PACKAGE}"
    found = [line for path in files for line in private_imports(path.read_text(), path)]
    assert not found, "private names used across modules (give them public names):\n" + "\n".join(
        found)


def test_the_checker_sees_both_forms():
    """The checker itself reports both ways of reaching into another module, and nothing else."""
    probe = PACKAGE / "convert" / "probe.py"  # a path only: nothing is written
    source = ("from megatron_patch.convert.hf_megatron import _dims, model_dims\n"
              "from ..models import _spec_helper\n"
              "from . import live\n"
              "import megatron_patch.tiny as tiny\n"
              "def f():\n"
              "    return tiny._helper(), live._bindings(), other._fine(), live.public()\n")
    found = [line.split(": ", 1)[1] for line in private_imports(source, probe)]
    assert found == ["from megatron_patch.convert.hf_megatron import _dims",
                     "from megatron_patch.models import _spec_helper",
                     "tiny._helper", "live._bindings"]


def test_every_fast_test_named_in_conftest_exists():
    """conftest.FAST_TESTS names test modules and tests; a renamed test must not silently leave
    `pytest -m fast`."""
    import conftest

    tests_dir = pathlib.Path(__file__).resolve().parent
    missing = []
    for entry in conftest.FAST_TESTS:
        module, _, test = entry.partition("::")
        path = tests_dir / f"{module}.py"
        if not path.is_file():
            missing.append(entry)
        elif test and test not in {n.name for n in ast.parse(path.read_text()).body
                                   if isinstance(n, ast.FunctionDef)}:
            missing.append(entry)
    assert not missing, f"conftest.FAST_TESTS names no such test: {missing}"


RLHF_MODULE_NAME = re.compile(r"\bmegatron_patch\.rlhf\b|(?<![\w/])rlhf\.\w")


def rlhf_references(source: str, path: pathlib.Path) -> list[str]:
    """'file:line: what' for each import of megatron_patch.rlhf, and each string naming one of
    its modules, in one file's source: `training` runs the modes `rlhf` registers, never names
    them."""
    tree = ast.parse(source, filename=str(path))
    module, is_package = _module_name(path), path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names = [f"{_absolute(node, module, is_package)}.{alias.name}"
                     for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if RLHF_MODULE_NAME.search(node.value):
                found.append(f"{path}:{node.lineno}: string {node.value!r}")
            continue
        else:
            continue
        found += [f"{path}:{node.lineno}: import {name}" for name in names
                  if name == "megatron_patch.rlhf" or name.startswith("megatron_patch.rlhf.")]
    return found


def test_training_does_not_know_rlhf():
    found = [hit for path in sorted((PACKAGE / "training").glob("*.py"))
             for hit in rlhf_references(path.read_text(), path)]
    assert not found, "training/ names rlhf modules (rlhf registers its modes):\n" + "\n".join(
        found)


def test_the_rlhf_checker_sees_every_form():
    path = PACKAGE / "training" / "example.py"
    for source in ("from megatron_patch.rlhf import dpo", "from megatron_patch import rlhf",
                   "import megatron_patch.rlhf.reward", "from ..rlhf.dpo import DPOMode",
                   "MODES = {'rm': 'megatron_patch.rlhf.reward:RewardMode'}",
                   "importlib.import_module('rlhf.dpo')"):
        assert rlhf_references(source, path), source
    for source in ("from megatron_patch.training import modes", "x = 'see rlhf/README.md'",
                   "import megatron_patch.rlhfx"):
        assert not rlhf_references(source, path), source

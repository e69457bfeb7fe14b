"""The shipped code deserves trust_remote_code=True: a static scan of the repository-root modules.

Root *.py files are what the dynamic-module loader copies and runs with the user's rights. They must
not unpickle (torch.load without weights_only=True), evaluate strings, start processes, touch the
network or print; they may only import each other with flat relative imports (the only form the
loader copies), and importing them must only define things.
"""

import ast
import json
from pathlib import Path

import pytest
from helpers import REPO_ROOT

ROOT_MODULES = sorted(REPO_ROOT.glob("*.py"))
FORBIDDEN_IMPORTS = {"subprocess", "socket", "requests", "urllib", "http", "httpx", "pickle", "ftplib"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__", "print", "breakpoint", "input"}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


@pytest.mark.parametrize("path", ROOT_MODULES, ids=lambda p: p.name)
def test_no_unsafe_calls_or_imports(path):
    problems = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            problems += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in FORBIDDEN_IMPORTS]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in FORBIDDEN_IMPORTS:
                problems.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if isinstance(func, ast.Name) and name in FORBIDDEN_CALLS:
                problems.append(f"line {node.lineno}: {name}()")
            if name == "load" and isinstance(func, ast.Attribute) and getattr(func.value, "id", "") == "torch":
                safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords)
                if not safe:
                    problems.append(f"line {node.lineno}: torch.load without weights_only=True")
            if name in {"system", "popen"} and getattr(func.value, "id", "") == "os":
                problems.append(f"line {node.lineno}: os.{name}()")
    assert not problems, f"{path.name}: " + "; ".join(problems)


@pytest.mark.parametrize("path", ROOT_MODULES, ids=lambda p: p.name)
def test_relative_imports_are_flat_and_present(path):
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            assert node.level == 1 and node.module and "." not in node.module, (
                f"{path.name}:{node.lineno}: only `from .module import X` is copied by the dynamic-module loader"
            )
            assert (REPO_ROOT / f"{node.module}.py").is_file(), f"{path.name} imports missing .{node.module}"


@pytest.mark.parametrize("path", ROOT_MODULES, ids=lambda p: p.name)
def test_import_time_only_defines(path):
    """Module level holds definitions, imports, docstrings and constant assignments; no calls with effects."""
    allowed = (
        ast.Import,
        ast.ImportFrom,
        ast.FunctionDef,
        ast.AsyncFunctionDef,
        ast.ClassDef,
        ast.Assign,
        ast.AnnAssign,
        ast.Try,
        ast.If,
    )
    for node in _tree(path).body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # docstring
        assert isinstance(node, allowed), f"{path.name}:{node.lineno}: top-level {type(node).__name__} statement"


def test_config_auto_map_points_at_existing_classes():
    """Every auto_map entry in the root's JSON configs names a class defined in a root module."""
    defined = {}
    for path in ROOT_MODULES:
        defined[path.stem] = {n.name for n in ast.walk(_tree(path)) if isinstance(n, ast.ClassDef)}
    configs = [p for p in (REPO_ROOT / "config.json", REPO_ROOT / "tokenizer_config.json") if p.is_file()]
    if not configs:
        pytest.skip("no config.json / tokenizer_config.json at the root yet")
    for cfg in configs:
        for auto, target in json.loads(cfg.read_text())["auto_map"].items():
            for ref in target if isinstance(target, list) else [target]:
                if ref is None:
                    continue
                module, cls = ref.rsplit(".", 1)
                assert cls in defined.get(module, set()), f"{cfg.name}: auto_map[{auto}] = {ref} does not exist"

"""The package's layout rules (issue 15): library code does not import the command line, no two
modules import each other, and the light commands do not import torch."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import siamese_detr

PACKAGE = Path(siamese_detr.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports at module level (not inside functions and not
    under ``if TYPE_CHECKING``)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        found: set[str] = set()
        for node in tree.body:  # module level only
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if t in modules and t != name:
                    found.add(t)
        graph[name] = found
    return graph


def _all_imports() -> dict[str, set[str]]:
    """Module -> every package module it imports anywhere (function bodies included)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {t for t in [node.module] + [f"{node.module}.{a.name}"
                                                      for a in node.names] if t in modules}
        found.discard(name)
        graph[name] = found
    return graph


def test_walker_sees_the_package() -> None:
    graph = _all_imports()
    assert "siamese_detr.cli.main" in graph and "siamese_detr.runner" in graph
    assert "siamese_detr.errors" in graph["siamese_detr.engine.checkpoint"]


def test_library_does_not_import_the_cli() -> None:
    offenders = sorted(f"{m} -> {t}" for m, targets in _all_imports().items()
                       if not m.startswith("siamese_detr.cli")
                       and m != "siamese_detr.__main__"
                       for t in targets if t.startswith("siamese_detr.cli"))
    assert offenders == []


def test_no_two_modules_import_each_other() -> None:
    graph = _all_imports()
    pairs = sorted({tuple(sorted((a, b))) for a, targets in graph.items() for b in targets
                    if a in graph.get(b, set())
                    # a package's lazy __getattr__ naming its own submodule is not a cycle
                    and not (b.startswith(a + ".") or a.startswith(b + "."))})
    assert pairs == []


def test_convert_target_names_listed_in_cli_match() -> None:
    from siamese_detr.cli.convert import TARGET_NAMES
    from siamese_detr.convert import TARGETS

    assert sorted(TARGET_NAMES) == sorted(TARGETS)


def _modules_after(code: str) -> set[str]:
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\n"
                          "print(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, env=env, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["config", "list"],
                                  ["config", "show", "tiny/conditional/finetune"],
                                  ["proposals", "--help"], ["convert", "--help"]])
def test_light_commands_do_not_import_torch(argv: list[str]) -> None:
    code = ("import contextlib, io, sys\nfrom siamese_detr.cli.main import main\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n"
            f"    try:\n        main({argv!r})\n    except SystemExit:\n        pass\n"
            "assert buf.getvalue()\n")
    mods = _modules_after(code)
    assert "siamese_detr.cli.main" in mods
    assert "torch" not in mods and "torchvision" not in mods


def test_version_via_python_m_does_not_import_torch() -> None:
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "siamese_detr", "--version"],
                         capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == f"siamese-detr {siamese_detr.__version__}"
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines()
                if line.startswith("import time:")}
    assert "siamese_detr.cli.main" in imported
    assert "torch" not in imported


def test_proposal_worker_modules_do_not_import_torch() -> None:
    mods = _modules_after("import siamese_detr.proposals.generate")
    assert "cv2" in mods and "torch" not in mods


def test_public_api_is_lazy_and_complete() -> None:
    mods = _modules_after("import siamese_detr")
    assert "torch" not in mods
    for name in ("load_detector", "build_detector", "get_preset", "RunConfig", "run"):
        assert name in siamese_detr.__all__
        assert callable(getattr(siamese_detr, name))
    with pytest.raises(AttributeError):
        siamese_detr.no_such_name  # noqa: B018

"""The layout's promises: ``mner.*`` imports resolve for static tools (mypy, pyright, IDEs) through the
``mner/`` links to the top-level folders without the editable-install hook (.ci/check_imports.py); the
wheel lists every sub-package; tests share helpers through tests/helpers/ and conftest, not each other."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("pipeline", "features", "trainer")  # mner/<name> links to ROOT/<name>


def test_every_first_party_import_resolves_and_a_broken_one_is_named(tmp_path):
    pytest.importorskip("mypy", reason="the dev extra's mypy runs the check: pip install -e '.[dev]'")
    broken = tmp_path / "broken_imports.py"
    broken.write_text("from mner.pipeline.data import not_a_name\nimport mner.trainer.gone\n"
                      "from mner.pipeline.tags import extract_entities\n", encoding="utf-8")
    result = subprocess.run([sys.executable, str(ROOT / ".ci" / "check_imports.py"), str(broken)],
                            capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    # the repository itself is clean: the only unresolved imports are the two broken ones
    assert result.returncode == 1, result.stdout + result.stderr
    assert len(errors) == 2 and all("broken_imports.py" in line for line in errors), result.stdout
    assert any('"not_a_name"' in line for line in errors) and any('"mner.trainer.gone"' in line for line in errors)


def test_mner_links_to_the_top_level_folders():
    for name in TOP_LEVEL:
        link = ROOT / "mner" / name
        assert link.is_symlink() and link.resolve() == (ROOT / name).resolve(), link


def test_the_wheel_lists_every_sub_package():
    """setuptools' explicit package list must name every folder with an __init__.py, or `pip install .`
    ships a wheel without it (the editable install would still work and hide the gap)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"mner"} | {
        "mner." + ".".join(init.parent.relative_to(ROOT).parts)
        for name in TOP_LEVEL for init in (ROOT / name).rglob("__init__.py")
    }
    assert found == listed, f"missing from pyproject: {sorted(found - listed)}; stale: {sorted(listed - found)}"


def test_tests_import_helpers_not_other_test_modules():
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} imports {name}"
                          for name in names if name.split(".")[0].startswith("test_")]
    assert not offenders, "move shared helpers to tests/helpers/ or conftest.py: " + "; ".join(offenders)


def test_the_architecture_tree_names_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    tree = text.split("```", 2)[1]  # the first code block is the tree
    missing = [str(path.relative_to(ROOT)) for name in TOP_LEVEL for path in sorted((ROOT / name).rglob("*.py"))
               if path.name != "__init__.py" and path.name not in tree]
    assert not missing, f"docs/architecture.md's tree does not name: {', '.join(missing)}"

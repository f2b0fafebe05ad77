"""Static import resolution: every ``mner.*`` import (and the tests' ``helpers.*``) resolves for a static
tool on a plain clone, through the ``mner/`` links to the top-level folders, with no install hook.

Runs mypy (``pip install -e ".[dev]"``) over ``mner/``, ``tests/`` and ``bench/`` with the settings in
pyproject.toml, and fails only on import resolution of first-party modules: a module that cannot be
found, or a name a module does not define. mypy's type errors are not part of this check.

    python .ci/check_imports.py            # exit 0: all resolve; 1: each unresolved import is listed
    python .ci/check_imports.py EXTRA.py   # also check these files (the test feeds it a broken one)
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("mner", "helpers", "conftest", "experiment_helpers")
TARGETS = ("mner", "tests", "bench")
IMPORT_CODES = ("import-not-found", "import-untyped", "import")
# path:line: error: message  [code]
ERROR = re.compile(r"^(?P<where>[^:]+:\d+): error: (?P<message>.*?)\s+\[(?P<code>[a-z-]+)\]$")
FIRST_QUOTED = re.compile(r'"([^"]+)"')


def is_first_party(module: str) -> bool:
    return module.split(".")[0] in FIRST_PARTY


def unresolved(mypy_output: str) -> list[str]:
    """The mypy errors that are import resolution of a first-party module."""
    found = []
    for line in mypy_output.splitlines():
        match = ERROR.match(line.strip())
        if match is None:
            continue
        message, code = match["message"], match["code"]
        quoted = FIRST_QUOTED.search(message)
        module = quoted.group(1) if quoted else ""
        missing_name = code == "attr-defined" and message.startswith("Module ")  # from mner.x import gone
        if (code in IMPORT_CODES or missing_name) and is_first_party(module):
            found.append(line.strip())
    return found


def main(argv: list[str] | None = None) -> int:
    extra = list(sys.argv[1:] if argv is None else argv)
    if not (ROOT / "mner" / "pipeline" / "__init__.py").is_file():
        print(f"check_imports: {ROOT / 'mner'} lacks its links to the top-level folders (pipeline, features, "
              "trainer); clone with symlinks enabled (git config core.symlinks true)", file=sys.stderr)
        return 1
    command = [sys.executable, "-m", "mypy", *TARGETS, *extra]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if "error:" not in result.stdout and result.returncode not in (0, 1):  # mypy itself failed
        print(result.stdout + result.stderr, file=sys.stderr)
        return 2
    problems = unresolved(result.stdout)
    checked = re.search(r"\(checked (\d+) source files?\)", result.stdout)
    for line in problems:
        print(line)
    files = checked.group(1) if checked else "?"
    if problems:
        print(f"check_imports: {len(problems)} first-party import(s) do not resolve ({files} files checked)")
        return 1
    print(f"check_imports: every first-party import resolves ({files} files checked by mypy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

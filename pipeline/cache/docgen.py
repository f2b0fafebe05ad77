"""Regenerate the tables of docs/cache-schema.md from the registered specs.

    python -m mner.pipeline.cache.docgen --write docs/cache-schema.md   # rewrite between the markers
    python -m mner.pipeline.cache.docgen                                # print them

``tests/test_cache_cli.py`` fails while the doc and the specs disagree.
"""

from __future__ import annotations

import sys

from mner.pipeline.cache.describe import schema_tables

BEGIN = "<!-- BEGIN GENERATED: python -m mner.pipeline.cache.docgen --write docs/cache-schema.md -->"
END = "<!-- END GENERATED -->"


def generated_block() -> str:
    return f"{BEGIN}\n\n{schema_tables()}\n{END}"


def rewrite(text: str) -> str:
    """``text`` with the part between the markers replaced by freshly generated tables."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"the document has no generated block ({BEGIN} ... {END})")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{generated_block()}{tail}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--write"] and len(argv) == 2:
        with open(argv[1], encoding="utf-8") as handle:
            text = handle.read()
        with open(argv[1], "w", encoding="utf-8") as handle:
            handle.write(rewrite(text))
        return 0
    print(schema_tables())
    return 0


if __name__ == "__main__":
    sys.exit(main())

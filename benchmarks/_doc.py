"""Write a benchmark's table into docs/benchmarks.md between its ``<!-- name:begin/end -->``
markers (appended under ``section`` when the markers are not there yet)."""
from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_block(name: str, table: str, section: str | None = None, doc: Path = DOC) -> Path:
    begin, end = markers(name)
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"{begin}\n{table}\n{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        if section and section not in text:
            text = text.rstrip("\n") + f"\n\n{section}\n"
        text = text.rstrip("\n") + f"\n\n{block}\n"
    doc.write_text(text)
    print(f"wrote {doc}")
    return doc

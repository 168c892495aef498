"""Paste the generated tables into docs/results.md between ``<!-- BEGIN name -->`` and ``<!-- END name -->``.

Sections come from `kvtune eval` folders (``results.jsonl``, via `kvtune report`'s table), a script's own markdown
table (``NAME.md``), or `kvtune bench`'s JSON (``NAME.json``). A section whose data is missing is left as it is.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from kvtune.bench import markdown_table as bench_table
from kvtune.eval.report import build_report

ROOT = Path(__file__).resolve().parent.parent
DOC, DATA = ROOT / "docs" / "results.md", ROOT / "docs" / "results"


def generated(name: str) -> str | None:
    folder = DATA / name
    if (folder / "results.jsonl").is_file():
        table, _ = build_report(folder)
        # results.md links its plot relatively; from docs/ it lives under results/<name>/
        return table.read_text().replace("](results.png)", f"](results/{name}/results.png)")
    if (folder / "bench.json").is_file():  # `kvtune bench` writing into its own folder
        return bench_table(json.loads((folder / "bench.json").read_text()))
    if (DATA / f"{name}.md").is_file():  # a script's own markdown table (scripts/bench_lococo_memory.py)
        return (DATA / f"{name}.md").read_text()
    if (DATA / f"{name}.json").is_file():
        return bench_table(json.loads((DATA / f"{name}.json").read_text()))
    return None


def main() -> None:
    text = DOC.read_text()
    for name in re.findall(r"<!-- BEGIN (\S+) -->", text):
        body = generated(name)
        if body is not None:
            pattern = re.compile(rf"(<!-- BEGIN {re.escape(name)} -->\n).*?(<!-- END {re.escape(name)} -->)", re.S)
            text = pattern.sub(lambda m, body=body: m.group(1) + body.rstrip() + "\n" + m.group(2), text)
    DOC.write_text(text)
    print(f"updated {DOC}")


if __name__ == "__main__":
    main()

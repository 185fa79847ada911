"""A benchmark run's raw files as one compact JSONL (what bench/results/ keeps in git), and back.

    python bench/results_jsonl.py pack RUN_DIR OUT.jsonl    # one line per file: {"file", "json"|"rows"|"text"}
    python bench/results_jsonl.py unpack OUT.jsonl DIR      # the files again (plots: rerun bench/train_plot.py)

Reports (.json) keep their structure, metrics (.jsonl) their rows, logs and tables (.txt, .log) their text. Images
are left out: they are drawn from the rows. The curated tables are in BENCHMARKS.md; these are their sources.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

SKIPPED = {".png"}


def pack(run_dir: Path, out: Path) -> int:
    lines = []
    files = sorted(run_dir.rglob("*")) if run_dir.is_dir() else [run_dir]
    for path in (p for p in files if p.is_file() and p.suffix not in SKIPPED):
        rel = str(path.relative_to(run_dir)) if run_dir.is_dir() else path.name
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            entry = {"file": rel, "json": json.loads(text)}
        elif path.suffix == ".jsonl":
            entry = {"file": rel, "rows": [json.loads(line) for line in text.splitlines() if line.strip()]}
        else:
            entry = {"file": rel, "text": text}
        lines.append(json.dumps(entry, separators=(",", ":"), ensure_ascii=False))
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def unpack(src: Path, out_dir: Path) -> int:
    n = 0
    for line in src.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        path = out_dir / entry["file"]
        if out_dir.resolve() not in path.resolve().parents:
            raise ValueError(f"{src}: {entry['file']!r} escapes {out_dir}")
        path.parent.mkdir(parents=True, exist_ok=True)
        if "json" in entry:
            path.write_text(json.dumps(entry["json"], indent=2) + "\n", encoding="utf-8")
        elif "rows" in entry:
            path.write_text("".join(json.dumps(r) + "\n" for r in entry["rows"]), encoding="utf-8")
        else:
            path.write_text(entry["text"], encoding="utf-8")
        n += 1
    return n


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("pack", "unpack"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    n = (pack if argv[0] == "pack" else unpack)(Path(argv[1]), Path(argv[2]))
    print(f"{argv[0]}: {n} files")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

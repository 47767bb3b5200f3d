"""``python -m bench.core_size``: the worker core's size against the tree before the batch loop,
and the modules and classes over the size guideline (issue 22).

Lines are counted two ways: as they stand, and as code (no blank lines, comments or
docstrings), so shorter prose does not pass for less code.
"""

from __future__ import annotations

import argparse
import ast
import io
import subprocess
import tokenize
from pathlib import Path

BASE = "f46bc43"  # the last tree before the batch loop (issue 22)
BASE_CORE = ["streams/app.py", "streams/engine.py", "streams/events_consumer.py",
             "streams/faust_patches.py", "streams/outbox.py", "streams/processor.py",
             "streams/tables.py"]
# Where those files' work lives now (readiness was part of the old app.py).
CORE = ["streams/worker/app.py", "streams/worker/faust_app.py", "streams/worker/loop.py",
        "streams/worker/step.py", "streams/worker/outbox.py", "streams/worker/tables.py",
        "streams/worker/readiness.py", "processors/*.py"]
PACKAGES = ["models", "processors", "sinks", "streams"]
MAX_MODULE_LINES, MAX_CLASS_LINES = 300, 150


def code_lines(source: str) -> int:
    """Lines holding code: not blank, not only a comment, not part of a docstring."""
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if (isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines: set[int] = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENDMARKER}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in skip:
            lines.update(n for n in range(token.start[0], token.end[0] + 1) if n not in docstrings)
    return len(lines)


def size(sources: dict[str, str]) -> tuple[int, int]:
    return (sum(len(s.splitlines()) for s in sources.values()),
            sum(code_lines(s) for s in sources.values()))


def oversized(root: Path) -> list[str]:
    """Production modules over MAX_MODULE_LINES and classes over MAX_CLASS_LINES."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if "_pb2" in path.name:  # generated from a .proto
                continue
            source = path.read_text()
            name = path.relative_to(root)
            if len(source.splitlines()) > MAX_MODULE_LINES:
                found.append(f"module {name}: {len(source.splitlines())} lines")
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.ClassDef):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_CLASS_LINES:
                        found.append(f"class {name}:{node.name}: {lines} lines")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.core_size", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args(argv)
    root = args.root
    base = {path: subprocess.run(["git", "-C", str(root), "show", f"{BASE}:{path}"], check=True,
                                 capture_output=True, text=True).stdout for path in BASE_CORE}
    now = {str(path.relative_to(root)): path.read_text()
           for pattern in CORE for path in sorted(root.glob(pattern))}
    (base_lines, base_code), (lines, code) = size(base), size(now)
    for path, source in [*base.items(), *now.items()]:
        print(f"{path:34} {len(source.splitlines()):5} lines {code_lines(source):5} code")
    print(f"worker core before ({BASE}): {base_lines} lines, {base_code} code")
    print(f"worker core now:            {lines} lines, {code} code")
    print(f"ratio: lines {lines / base_lines:.2f}×, code {code / base_code:.2f}× (target ≤ 0.75×)")
    over = oversized(root)
    print(f"over the size guideline (module > {MAX_MODULE_LINES}, class > {MAX_CLASS_LINES} lines): "
          + ("none" if not over else ""))
    for line in over:
        print("  " + line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The shape of the house, as figures: README and BENCHMARKS line counts, the flags in `ditkit train --help`'s
main group, the longest functions in ditkit/, the imports across floors that must not exist (sampling or
runs from train/, train/ from viz/), and (with --compare BEFORE AFTER) whether two runs of the same recipe
logged the same losses and saved the same weights.

    python benchmarks/house.py
    python benchmarks/house.py --compare /tmp/before /tmp/after   # runs of: ditkit train --out DIR
        --max-steps 40 --seed 0 --no-compile --log-every 1 --no-progress (the old code through a worktree)
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main_group_flags() -> list[str]:
    from ditkit.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(["train", "--help"])
    group = out.getvalue().split("\noptions:\n", 1)[1].split("\n\n", 1)[0]
    return [ln.split()[0].rstrip(",") for ln in group.splitlines() if ln.startswith("  -")]


def longest_functions(package: str, n: int = 3) -> list[tuple[int, str]]:
    found = []
    for path in sorted((ROOT / "ditkit" / package).rglob("*.py")) if package else sorted((ROOT / "ditkit").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(ROOT)}:{node.name}"))
    return sorted(found, reverse=True)[:n]


def imports_of(package: str, target: str) -> list[str]:
    """Modules of ditkit/<package> that import ditkit.<target> (absolute or relative)."""
    hits = []
    paths = [ROOT / "ditkit" / package] if package.endswith(".py") else sorted((ROOT / "ditkit" / package).rglob("*.py"))
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = ("." * node.level) + (node.module or "")
                names = (f"..{target}", f".{target}", f"ditkit.{target}")
                if mod in names or mod.startswith(tuple(n + "." for n in names)):
                    hits.append(f"{path.relative_to(ROOT)}: from {mod} import ...")
    return hits


def compare(before: Path, after: Path) -> bool:
    keys = ("step", "epoch", "loss", "loss_avg", "grad_norm", "lr")
    a = [json.loads(x) for x in (before / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (after / "metrics.jsonl").read_text().splitlines()]
    same_log = len(a) == len(b) and all(r[k] == s[k] for r, s in zip(a, b) for k in keys)
    last = json.loads((before / "checkpoints" / "latest.json").read_text())["path"]
    same_weights = all((before / "checkpoints" / last / f).read_bytes() == (after / "checkpoints" / last / f).read_bytes()
                       for f in ("model.safetensors", "ema.safetensors"))
    print(f"{len(a)} logged steps: losses, grad norms and lr {'identical' if same_log else 'DIFFER'}; "
          f"weights and EMA at {last} {'identical' if same_weights else 'DIFFER'}")
    return same_log and same_weights


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), type=Path)
    args = ap.parse_args()
    lines = {f: len((ROOT / f).read_text().splitlines()) for f in ("README.md", "docs/BENCHMARKS.md")}
    print(", ".join(f"{f}: {n} lines" for f, n in lines.items()))
    flags = main_group_flags()
    print(f"ditkit train --help: {len(flags)} flags in the main group ({' '.join(flags)})")
    longest = longest_functions("", 3)
    print("longest functions in ditkit/: " + ", ".join(f"{name} {n} lines" for n, name in longest))
    hits = imports_of("train", "viz") + imports_of("sampling.py", "train") + imports_of("runs.py", "train")
    print(f"imports that cross a floor the wrong way (train/ -> viz/, sampling or runs -> train/): {len(hits)}"
          + "".join(f"\n  {h}" for h in hits))
    ok = len(flags) <= 35 and not hits and longest[0][0] <= 100 and lines["README.md"] <= 150 \
        and lines["docs/BENCHMARKS.md"] <= 400
    if args.compare:
        ok = compare(*args.compare) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Score `porter predict --format csv` output against the class folder each image sits in.

    python examples/digits/score.py pretrained=out/example/predictions.csv random=out/example/predictions_random.csv

Prints the test accuracy of each run; the first named run is compared with the others. Exits 1 if a run's CSV
has unreadable rows or is empty.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path


def accuracy(path: Path) -> tuple[float, int, list[str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    errors = [r["path"] for r in rows if r.get("error")]
    scored = [r for r in rows if not r.get("error")]
    correct = sum(Path(r["path"]).parent.name == r["label"] for r in scored)
    return (correct / len(scored) if scored else 0.0), len(scored), errors


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    results = {}
    for arg in argv:
        name, _, path = arg.partition("=")
        acc, n, errors = accuracy(Path(path))
        if errors or not n:
            print(f"{name}: {len(errors)} unreadable rows, {n} scored", file=sys.stderr)
            return 1
        results[name] = acc
        print(f"{name:>28}: test accuracy {acc:.4f} ({round(acc * n)}/{n} held-out images, "
              f"{n - round(acc * n)} errors)")
    names = list(results)
    for other in names[1:]:
        gain = results[names[0]] - results[other]
        print(f"{'':>28}  {names[0]} vs {other}: {gain * 100:+.1f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

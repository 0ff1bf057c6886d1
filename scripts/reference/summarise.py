#!/usr/bin/env python3
"""Side-by-side table of two-moons runs from JSON-lines files: the lines printed by
`moons_jax.py` (framework "jax") and by `flowfuse train` (framework taken as "flowfuse").
Summary lines are skipped; the table is recomputed from the per-run lines.

Usage: python3 summarise.py FILE.jsonl [FILE.jsonl ...]     (standard library only)
"""

import json
import statistics
import sys
from collections import defaultdict


def load(paths):
    groups = defaultdict(list)
    for path in paths:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line.startswith("{"):
                    continue
                row = json.loads(line)
                if row.get("summary") or "test_nll" not in row:
                    continue
                groups[(row["model"], row.get("framework", "flowfuse"))].append(row)
    return groups


def spread(values):
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, sd, min(values), max(values)


def main(paths):
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    groups = load(paths)
    head = f"{'model':8} {'framework':9} {'runs':>4}  {'test NLL mean ± sd [min, max]':34} {'train NLL':>9} {'seconds':>8} {'samples/s':>10}"
    print(head)
    print("-" * len(head))
    for (model, framework), rows in sorted(groups.items()):
        t = spread([r["test_nll"] for r in rows])
        tr = statistics.fmean(r["train_nll"] for r in rows)
        sec = statistics.fmean(r["seconds"] for r in rows)
        sps = statistics.fmean(r["samples_per_second"] for r in rows)
        cell = f"{t[0]:.4f} ± {t[1]:.4f} [{t[2]:.4f}, {t[3]:.4f}]"
        print(f"{model:8} {framework:9} {len(rows):>4}  {cell:34} {tr:9.4f} {sec:8.2f} {sps:10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

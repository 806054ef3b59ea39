#!/usr/bin/env python3
"""Compare two `pe-clip run --events` files (e.g. the aarch64 binary under qemu against x86_64):
the same events, the same labels, probabilities within a tolerance. Standard library only.

usage: scripts/compare_events.py A.jsonl B.jsonl [--prob-tol 1e-3]
"""
import json
import sys


def main(argv):
    args = [a for a in argv if not a.startswith("--")]
    tol = 1e-3
    if "--prob-tol" in argv:
        tol = float(argv[argv.index("--prob-tol") + 1])
        args.remove(argv[argv.index("--prob-tol") + 1])
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    a, b = ([json.loads(line) for line in open(p)] for p in args)
    if len(a) != len(b) or not a:
        print(f"event counts differ or are zero: {len(a)} vs {len(b)}", file=sys.stderr)
        return 1
    worst, labels = 0.0, 0
    for x, y in zip(a, b):
        if (x["frame"], x["partial"]) != (y["frame"], y["partial"]):
            print(f"events differ in order: {x['frame']} vs {y['frame']}", file=sys.stderr)
            return 1
        labels += x["label"] == y["label"]
        worst = max(worst, max(abs(p - q) for p, q in zip(x["probs"], y["probs"])))
    print(f"{len(a)} events, {labels} equal labels, largest probability difference {worst:.2e}")
    return 0 if labels == len(a) and worst <= tol else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

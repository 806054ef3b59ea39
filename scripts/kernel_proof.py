#!/usr/bin/env python3
"""Check which matrix kernels tract runs, from `pe-clip info --package P --cost --json`: the
kernel named by --kernel must carry at least --min-share of the package's multiply-accumulates
of element type --class (e.g. `matmul i8`), and --absent names a kernel that must not run at all.
Prints the kernels. Standard library only.

usage: scripts/kernel_proof.py COST.json --class "matmul i8" --kernel arm64simd_mmm_i32_8x8_dot
                               [--min-share 0.95] [--absent NAME]
"""
import json
import sys


def flag(argv, name, default=None):
    if name in argv:
        return argv[argv.index(name) + 1]
    return default


def main(argv):
    if len(argv) < 1 or "--class" not in argv or "--kernel" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    info = json.load(open(argv[0]))
    cost = info.get("cost") or {}
    klass, kernel = flag(argv, "--class"), flag(argv, "--kernel")
    share_min = float(flag(argv, "--min-share", "0.95"))
    absent = flag(argv, "--absent")
    total = sum(c["macs"] for c in cost.get("classes", []) if c["class"] == klass)
    kernels = cost.get("kernels", [])
    print(f"{info.get('machine')}: {klass} {total:,} MACs per step")
    for k in kernels:
        print(f"  {k['kernel']:<34} {k['nodes']:>4} nodes {k['macs']:>16,} MACs  {k['packing']}")
    if total == 0:
        print(f"no {klass} products in {argv[0]}", file=sys.stderr)
        return 1
    carried = sum(k["macs"] for k in kernels if k["kernel"] == kernel)
    if carried < share_min * total:
        print(f"{kernel} carries {carried:,} of {total:,} {klass} MACs "
              f"(under {share_min:.0%})", file=sys.stderr)
        return 1
    if absent and any(k["kernel"] == absent for k in kernels):
        print(f"{absent} runs, and must not here", file=sys.stderr)
        return 1
    print(f"{kernel}: {carried / total:.1%} of the {klass} MACs")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

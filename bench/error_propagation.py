"""How one registration's error reaches the last section, for three ways to place a stack.

A scalar model of issue 3's robustness test (docs/estimators.md, "Where this stands"): section 0 is
fixed, every registration adds an independent error of 1 (any unit), and each section's placement
g_z solves
* a chain: g_z = g_{z-1} + e_z (every serial aligner, the workflow's blocks included);
* links to the K previous sections, solved together by least squares: g_z - g_{z-k} = e_{z,k}
  (bench/link_solve.py; the real links are not consistent with each other, so this is its best case);
* a template of W neighbours on each side: g_z - mean(g_{z+j}, 0 < |j| <= W) = e_z (one equation per
  section, solved exactly).
It prints the error's standard deviation at a few sections, so that the figures in the docs can be
checked: no image is read, the result depends only on the structure of the equations.
"""

from __future__ import annotations

import argparse

import numpy as np


def chain(sections: int) -> np.ndarray:
    """Std of g_1..g_{n-1} for a chain: a random walk."""
    return np.sqrt(np.arange(1, sections, dtype=float))


def links(sections: int, k: int) -> np.ndarray:
    """Std of g_1..g_{n-1} when every section is linked to its k previous ones (least squares)."""
    rows = []
    for z in range(1, sections):
        for back in range(1, k + 1):
            if z - back < 0:
                continue
            row = np.zeros(sections - 1)
            row[z - 1] = 1.0
            if z - back > 0:
                row[z - back - 1] = -1.0
            rows.append(row)
    a = np.asarray(rows)
    return np.sqrt(np.diag(np.linalg.inv(a.T @ a)))


def template(sections: int, w: int) -> np.ndarray:
    """Std of g_1..g_{n-1} when each section is registered to the mean of w neighbours on each side."""
    a = np.zeros((sections - 1, sections - 1))
    for z in range(1, sections):
        a[z - 1, z - 1] = 1.0
        near = [j for j in range(z - w, z + w + 1) if j != z and 0 <= j < sections]
        for j in near:
            if j > 0:
                a[z - 1, j - 1] -= 1.0 / len(near)
    inverse = np.linalg.inv(a)
    return np.sqrt((inverse**2).sum(axis=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", type=int, default=30, help="stack length, section 0 fixed (default 30)")
    parser.add_argument("--at", type=int, nargs="+", default=[1, 5, 15, 29], help="sections to print")
    args = parser.parse_args()
    if args.sections < 2:
        parser.error("--sections must be at least 2 (section 0 is the fixed one)")
    if any(not 0 < z < args.sections for z in args.at):
        parser.error(f"--at must name sections 1..{args.sections - 1}")
    cases = [("chain", chain(args.sections))]
    cases += [(f"links to the {k} previous sections", links(args.sections, k)) for k in (2, 3)]
    cases += [(f"template of {w} neighbour(s) each side", template(args.sections, w)) for w in (1, 3, 5)]
    print("| placement | " + " | ".join(f"z = {z}" for z in args.at) + " |")
    print("|---|" + "---|" * len(args.at))
    for name, std in cases:
        print(f"| {name} | " + " | ".join(f"{std[z - 1]:.2f}" for z in args.at) + " |")


if __name__ == "__main__":
    main()

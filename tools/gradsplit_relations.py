#!/usr/bin/env python
"""GradSplit task relations from single-task and pair-task results (paper 000 §3.2).

Input JSON::

    {"single": {"attr": 78.0, "reid": 81.1, ...},             # metric of each single-task model
     "pairwise": {"attr,reid": {"attr": 77.1, "reid": 79.9},  # both tasks' metric of each
                  ...},                                        # two-task model
     "lower_is_better": ["depth"],                             # optional
     "tasks": ["attr", "reid", ...]}                           # optional task order

Prints the relative changes ``A(t'→t)`` and the mask ``m[t, t'] = 1[A(t'→t) >= τ]``
(rows: filter group t, columns: source loss t'; τ = −0.01). ``--out`` writes
``{"tasks": [...], "tau": τ, "relation": [[...]]}``: give its path as the GradSplit config's
relation (mmseg ``optim_wrapper.mtl.gradsplit.relation``, LazyConfig
``train.mtl.gradsplit.relation``, yacs ``MTL.GRADSPLIT.RELATION_FILE``); the results file
itself is accepted there too (see ``load_relation``).

    python tools/gradsplit_relations.py results.json --tau -0.01 --out relation.json
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from mtl_plugins.core.structure.gradsplit import relations_from_results, relative_changes


def _table(names, rows, fmt) -> str:
    width = max(8, *(len(n) for n in names)) + 1
    head = "group t \\ source t'".ljust(width + 12) + "".join(n.rjust(width) for n in names)
    lines = [head]
    for n, row in zip(names, rows):
        lines.append(n.ljust(width + 12) + "".join(fmt(v).rjust(width) for v in row))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", help="JSON file with 'single' and 'pairwise' results")
    ap.add_argument("--tau", type=float, default=-0.01, help="tolerance τ (default -0.01)")
    ap.add_argument("--out", help="write the relation matrix to this JSON file")
    args = ap.parse_args(argv)
    with open(args.results) as fh:
        data = json.load(fh)
    kw = dict(task_names=data.get("tasks"), lower_is_better=data.get("lower_is_better", ()))
    names, change = relative_changes(data["single"], data["pairwise"], **kw)
    rel = relations_from_results(data["single"], data["pairwise"], tau=args.tau, **kw)
    print("relative change A(t'->t) (row t: task measured, column t': task trained with it)")
    print(_table(names, change.tolist(), lambda v: f"{100 * v:+.2f}%"))
    print(f"\nGradSplit relation m[t, t'] (tau = {args.tau})")
    print(_table(names, rel.int().tolist(), str))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"tasks": list(names), "tau": args.tau, "relation": rel.int().tolist()},
                      fh, indent=1)
        print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

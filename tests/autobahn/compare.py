#!/usr/bin/env python3
"""Summarise a kosoku (Autobahn) report and compare it against the committed expectations.

Reads the `index.json` that `kosoku -o DIR` writes (Autobahn's format:
``{agent: {case_id: {"behavior": ..., "behaviorClose": ...}}}``), writes a
machine-readable summary, prints a per-group table, and compares every case
against `expected.json`:

* a case whose `behavior` or `behaviorClose` got worse, or that is missing,
  is a regression: exit status 1;
* a case that got better is printed as an improvement (exit status 0);
  refresh the expectations with `--write-expected`.

Ranking, best first. behavior: OK < NON-STRICT < INFORMATIONAL < UNIMPLEMENTED
< FAILED < ERROR (kosoku's "could not run the case"). behaviorClose: OK <
INFORMATIONAL < any failing close verdict (WRONG CODE, UNCLEAN, FAILED BY
CLIENT, FAILED, ...); moves between two failing close verdicts are reported but
are no regression. Unknown labels rank worst.

Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

BEHAVIOR_RANK = {
    "OK": 0,
    "NON-STRICT": 1,
    "INFORMATIONAL": 2,
    "UNIMPLEMENTED": 3,
    "FAILED": 4,
    "ERROR": 5,
}
CLOSE_RANK = {"OK": 0, "INFORMATIONAL": 1}
CLOSE_FAILED_RANK = 2
UNKNOWN_RANK = 99

# Columns of the per-group table (a case's overall outcome, see `outcome`).
COLUMNS = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]


def behavior_rank(label: str) -> int:
    return BEHAVIOR_RANK.get(label, UNKNOWN_RANK)


def close_rank(label: str) -> int:
    return CLOSE_RANK.get(label, CLOSE_FAILED_RANK)


def outcome(behavior: str, behavior_close: str) -> str:
    """One column per case: its behavior, or FAILED if the close failed.

    ERROR (the case could not be run) and unknown labels count as FAILED,
    as Autobahn's report marks a case red when either verdict fails.
    """
    if close_rank(behavior_close) >= CLOSE_FAILED_RANK:
        return "FAILED"
    return behavior if behavior in COLUMNS else "FAILED"


def case_key(case_id: str) -> list[int]:
    return [int(p) for p in case_id.split(".")]


def load_results(index_path: Path) -> dict[str, dict[str, str]]:
    index = json.loads(index_path.read_text())
    if len(index) != 1:
        sys.exit(f"error: expected exactly one agent in {index_path}, got {list(index)}")
    (cases,) = index.values()
    return {
        cid: {"behavior": c["behavior"], "behaviorClose": c["behaviorClose"]}
        for cid, c in sorted(cases.items(), key=lambda kv: case_key(kv[0]))
    }


def group_counts(cases: dict[str, dict[str, str]]) -> dict[str, dict[str, int]]:
    groups: dict[str, Counter[str]] = {}
    for cid, c in cases.items():
        group = cid.split(".")[0]
        groups.setdefault(group, Counter())[outcome(c["behavior"], c["behaviorClose"])] += 1
    return {
        g: {col: groups[g][col] for col in COLUMNS}
        for g in sorted(groups, key=int)
    }


def format_table(counts: dict[str, dict[str, int]]) -> str:
    header = ["group", "cases", *COLUMNS]
    rows = [
        [g, str(sum(c.values())), *(str(c[col]) for col in COLUMNS)]
        for g, c in counts.items()
    ]
    totals = {col: sum(c[col] for c in counts.values()) for col in COLUMNS}
    rows.append(["total", str(sum(totals.values())), *(str(totals[col]) for col in COLUMNS)])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def compare(
    expected: dict[str, dict[str, str]], actual: dict[str, dict[str, str]]
) -> tuple[list[str], list[str], list[str]]:
    """Return (regressions, improvements, notes) as printable lines."""
    regressions: list[str] = []
    improvements: list[str] = []
    notes: list[str] = []
    for cid in sorted(expected, key=case_key):
        exp = expected[cid]
        act = actual.get(cid)
        if act is None:
            regressions.append(f"{cid}: missing from the run (expected {exp['behavior']}/{exp['behaviorClose']})")
            continue
        change = (
            f"{cid}: {exp['behavior']}/{exp['behaviorClose']} -> "
            f"{act['behavior']}/{act['behaviorClose']}"
        )
        db = behavior_rank(act["behavior"]) - behavior_rank(exp["behavior"])
        dc = close_rank(act["behaviorClose"]) - close_rank(exp["behaviorClose"])
        if db > 0 or dc > 0:
            regressions.append(change)
        elif db < 0 or dc < 0:
            improvements.append(change)
        elif act != exp:
            notes.append(change + " (changed, same rank)")
    for cid in sorted(set(actual) - set(expected), key=case_key):
        act = actual[cid]
        notes.append(f"{cid}: not in expected.json (got {act['behavior']}/{act['behaviorClose']})")
    return regressions, improvements, notes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", required=True, type=Path, help="kosoku's index.json")
    parser.add_argument("--expected", required=True, type=Path, help="committed expected.json")
    parser.add_argument("--summary", type=Path, help="write the machine-readable summary here")
    parser.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                        help="extra string field for the summary (repeatable)")
    parser.add_argument("--excluded", action="append", default=[], metavar="CASE",
                        help="case excluded from the run, recorded in the summary (repeatable)")
    parser.add_argument("--write-expected", action="store_true",
                        help="overwrite expected.json with this run's results instead of comparing")
    args = parser.parse_args()

    actual = load_results(args.index)
    counts = group_counts(actual)

    if args.summary:
        summary = {
            **dict(kv.split("=", 1) for kv in args.meta),
            "excluded": args.excluded,
            "groups": counts,
            "cases": {
                cid: {**c, "outcome": outcome(c["behavior"], c["behaviorClose"])}
                for cid, c in actual.items()
            },
        }
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(summary, indent=2) + "\n")

    print(format_table(counts))
    print()

    if args.write_expected:
        # One case per line, so that a change of expectation is a one-line diff.
        lines = [f"  {json.dumps(cid)}: {json.dumps(c)}" for cid, c in actual.items()]
        args.expected.write_text('{\n "cases": {\n' + ",\n".join(lines) + "\n }\n}\n")
        print(f"wrote {len(actual)} cases to {args.expected}")
        return 0

    expected = json.loads(args.expected.read_text())["cases"]
    regressions, improvements, notes = compare(expected, actual)
    for line in notes:
        print(f"note: {line}")
    for line in improvements:
        print(f"IMPROVED: {line}")
    if improvements:
        print("(better than expected: refresh tests/autobahn/expected.json with --write-expected)")
    for line in regressions:
        print(f"REGRESSION: {line}")
    worse = len(regressions)
    if worse:
        print(f"{worse} case(s) worse than {args.expected}")
    else:
        print(f"no case worse than {args.expected} ({len(improvements)} improved)")
    # Plain closing line: "passed" = expected cases at least as good as expected.
    print(f"autobahn: {len(expected) - worse} passed, {worse} failed")
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())

"""Issue 16's one-step speed targets next to the numbers of `dd2-eval bench --random-init` reports.

    python packages/dd2-eval/bench/speed_targets.py llamagen-l=OUT/llamagen-l/bench.json var-d16=OUT/var-d16/bench.json
        [--out OUT/targets.json]

Targets (one GPU, bf16, the one-step pipeline's fast path, decoding included on both sides):
    llamagen-l  batch 1: <= 20 ms and >= 280x the eager AR sampler; batch 64: >= 800 images/s and >= 9x the compiled
                AR sampler
    var-d16     batch 1: <= 15 ms and >= 10x the eager AR sampler
Every other speed-up the report holds (generator alone, other mode pairs) is printed too, without a target. A
target whose numbers are missing (a run cut short) is reported as 'missing'. Exit status 0 unless a file is bad.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# (size, batch, what, one-step mode, AR mode, comparison, target); what: 'ms' = one-step median ms, 'images/s' =
# one-step throughput, 'x' = speed-up over the AR sampler
TARGETS: list[tuple[str, int, str, str, str | None, str, float]] = [
    ("llamagen-l", 1, "ms", "compiled", None, "<=", 20.0),
    ("llamagen-l", 1, "x", "compiled", "eager", ">=", 280.0),
    ("llamagen-l", 64, "images/s", "compiled", None, ">=", 800.0),
    ("llamagen-l", 64, "x", "compiled", "compiled", ">=", 9.0),
    ("var-d16", 1, "ms", "compiled", None, "<=", 15.0),
    ("var-d16", 1, "x", "compiled", "eager", ">=", 10.0),
]


def _one_step(report: dict[str, Any], batch: int, mode: str) -> dict[str, Any] | None:
    for t in report["timings"]:
        if (t["target"], t["mode"], t["batch_size"], t.get("decode", True)) == ("dd2 one-step", mode, batch, True):
            return t
    return None


def _speedup(report: dict[str, Any], batch: int, decode: bool, one: str, ar: str) -> float | None:
    for r in report.get("speedups", []):
        if (r["batch_size"], r["decode"], r["one_step_mode"], r["teacher_mode"]) == (batch, decode, one, ar):
            return r["speedup"]
    return None


def check(reports: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per target of a size in `reports`: measured value (None = missing) and whether it is met."""
    rows = []
    for size, batch, what, one, ar, cmp, target in TARGETS:
        if size not in reports:
            continue
        report = reports[size]
        if what == "x":
            value = _speedup(report, batch, True, one, ar)
        else:
            t = _one_step(report, batch, one)
            value = None if t is None else (t["median_s"] * 1e3 if what == "ms" else t["images_per_s"])
        met = None if value is None else (value <= target if cmp == "<=" else value >= target)
        name = f"one-step ({one}) batch {batch}" + (f" vs AR ({ar})" if ar else "")
        rows.append({"size": size, "measure": name, "unit": what, "target": f"{cmp} {target:g}", "value": value,
                     "met": met, "device": report["device"], "dtype": report["dtype"]})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", help="SIZE=bench.json (sizes: llamagen-l, var-d16, ...)")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    reports = {}
    for item in args.reports:
        size, _, path = item.partition("=")
        if not path:
            parser.error(f"expected SIZE=bench.json, got {item!r}")
        if not Path(path).is_file():
            print(f"{size}: no report at {path} (the run did not get far enough)")
            continue
        reports[size] = json.loads(Path(path).read_text())
    rows = check(reports)
    for r in rows:
        value = "missing" if r["value"] is None else f"{r['value']:,.2f} {r['unit']}"
        verdict = {True: "MET", False: "NOT MET", None: "missing"}[r["met"]]
        print(
            f"{r['size']:<11} {r['measure']:<40} target {r['target']:<8} {r['unit']:<9} measured {value:<18} {verdict}"
        )
    for size, report in reports.items():
        print(f"{size}: {report['device']} | {report['dtype']} | torch {report['torch_version']}")
        for s in report.get("speedups", []):
            print(f"  batch {s['batch_size']:>3} {'with decode' if s['decode'] else 'generator alone':<15} one-step "
                  f"{s['one_step_mode']:<8} {s['one_step_ms']:10.2f} ms vs AR {s['teacher_mode']:<8} "
                  f"{s['teacher_ms']:10.2f} ms = {s['speedup']:8.1f}x")  # fmt: skip
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The fault table: ``python -m e2e.report`` (quick form, as CI runs it) or ``--full`` (200 jobs under worker
SIGKILLs). ``--write docs/reliability.md`` records the figures. Needs the test bed or KUBECONFIG."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import astuple, fields
from pathlib import Path

from conftest import install_crds, kube_cluster
from e2e.faults import SCENARIOS, Row

QUICK = {
    "worker-sigkill": 30,
    "operator-sigkill": 20,
    "redis-restart": 20,
    "kube-api-outage": 20,
    "oom": 6,
    "poison": 6,
}
FULL = {
    "worker-sigkill": 200,
    "operator-sigkill": 100,
    "redis-restart": 100,
    "kube-api-outage": 100,
    "oom": 20,
    "poison": 20,
}


def table(rows: list[Row]) -> str:
    head = [f.name for f in fields(Row)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(v) for v in astuple(r)) + " |" for r in rows]
    return "\n".join(lines)


def run(sizes: dict[str, int], only: list[str] | None = None) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="zimage-faults-") as tmp, kube_cluster(Path(tmp) / "kube") as kube:
        install_crds(kube)
        for name, jobs in sizes.items():
            if only and name not in only:
                continue
            t0 = time.monotonic()
            rows.append(SCENARIOS[name](kube, Path(tmp) / name, jobs))
            print(f"{name}: {rows[-1]} ({time.monotonic() - t0:.0f}s)", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m e2e.report", description=__doc__)
    p.add_argument("--full", action="store_true")
    p.add_argument("--only", action="append", choices=sorted(SCENARIOS))
    p.add_argument("--write", type=Path, default=None, help="also write the table into this Markdown file")
    args = p.parse_args(argv)
    rows = run(FULL if args.full else QUICK, args.only)
    text = table(rows)
    print(text)
    if args.write:
        form = "full" if args.full else "quick"
        args.write.write_text(
            "# Reliability: the fault table\n\n"
            f"`python -m e2e.report{' --full' if args.full else ''}` ({form} form), "
            f"{time.strftime('%Y-%m-%d')}, on the Kubernetes test bed with workers as local processes:\n\n"
            f"{text}\n\n"
            "lost: neither succeeded nor failed as the scenario expects. duplicated: a result recorded twice, or "
            "extra child objects. reruns: jobs that ran more than once (at-least-once delivery after a kill).\n"
        )
    return 0 if all(r.lost == 0 and r.duplicated == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The fault table: ``python -m e2e.report`` (quick form, as CI runs it) or ``--full`` (200 jobs under worker
SIGKILLs, Redis down 60 s). ``--write docs/reliability.md`` records the figures. Needs the test bed or
KUBECONFIG."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import astuple, fields
from pathlib import Path
from typing import Any

from conftest import install_crds, kube_cluster
from e2e.faults import SCENARIOS, Row

# Each scenario's keyword arguments: how many jobs, and for an outage how long it lasts.
QUICK: dict[str, dict[str, Any]] = {
    "worker-sigkill": {"jobs": 30},
    "operator-sigkill": {"jobs": 20},
    "redis-restart": {"jobs": 20},
    "kube-api-outage": {"jobs": 20},
    "oom": {"jobs": 6},
    "poison": {"jobs": 6},
    "redis-down": {"jobs": 20, "seconds": 15},
    "poison-events": {"jobs": 12},
    "rolling-upgrade": {"jobs": 18},
    "leader-failover": {"jobs": 20},
}
FULL: dict[str, dict[str, Any]] = {
    "worker-sigkill": {"jobs": 200},
    "operator-sigkill": {"jobs": 100},
    "redis-restart": {"jobs": 100},
    "kube-api-outage": {"jobs": 100},
    "oom": {"jobs": 20},
    "poison": {"jobs": 20},
    "redis-down": {"jobs": 100, "seconds": 60},
    "poison-events": {"jobs": 100},
    "rolling-upgrade": {"jobs": 100},
    "leader-failover": {"jobs": 100},
}


def table(rows: list[Row]) -> str:
    head = [f.name for f in fields(Row)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(v) for v in astuple(r)) + " |" for r in rows]
    return "\n".join(lines)


def run(sizes: dict[str, dict[str, Any]], only: list[str] | None = None) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="zimage-faults-") as tmp, kube_cluster(Path(tmp) / "kube") as kube:
        install_crds(kube)
        for name, size in sizes.items():
            if only and name not in only:
                continue
            t0 = time.monotonic()
            rows.append(SCENARIOS[name](kube, Path(tmp) / name, **size))
            print(f"{name}: {rows[-1]} ({time.monotonic() - t0:.0f}s)", file=sys.stderr)
    return rows


def write(doc: Path, form: str, text: str) -> None:
    """Replace the ``form`` table in ``doc`` (between its BEGIN/END markers), keeping the rest of the page."""
    begin, end = f"<!-- BEGIN {form} table -->", f"<!-- END {form} table -->"
    page = doc.read_text() if doc.exists() else f"# Reliability: the fault table\n\n{begin}\n{end}\n"
    if begin not in page or end not in page:
        raise SystemExit(f"{doc} has no {begin} ... {end} markers")
    stamp = (
        f"{form.capitalize()} form, {time.strftime('%Y-%m-%d')}, `python -m e2e.report{' --full' * (form == 'full')}`:"
    )
    head, rest = page.split(begin, 1)
    doc.write_text(f"{head}{begin}\n{stamp}\n\n{text}\n{end}{rest.split(end, 1)[1]}")


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
        write(args.write, "full" if args.full else "quick", text)
    return 0 if all(r.lost == 0 and r.duplicated == 0 and r.stuck == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

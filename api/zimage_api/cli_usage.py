"""``zimage usage``: GPU-seconds, cost, images and jobs from the API's history store (``GET /v1/usage``), per
tenant, model or UTC day: a table with a TOTAL row, or ``-o json|yaml`` (the API's answer as it is). A key sees
its own tenant's usage; an admin key (``zimage keys create --admin``) every tenant's, ``--tenant`` narrows."""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

from zimage_api.cli_client import ApiClient
from zimage_api.cli_config import Shared
from zimage_api.cli_errors import UserError
from zimage_api.cli_output import table
from zimage_operator.conditions import iso

GROUPS = ("tenant", "model", "day")
_DURATION = re.compile(r"^([1-9][0-9]{0,5})([smhdw])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
COLUMNS = ("ATTEMPTS", "JOBS", "SUCCEEDED", "IMAGES", "GPU-SECONDS")
COUNTS = ("attempts", "jobs", "succeeded", "images")


def duration(text: str, flag: str = "--since") -> timedelta:
    """``30m``, ``12h``, ``7d``, ``2w`` (and ``s``)."""
    m = _DURATION.match(text)
    if m is None:
        raise UserError(f"{flag}: a duration such as 30m, 12h, 7d or 2w, got {text!r}")
    return timedelta(seconds=int(m[1]) * _SECONDS[m[2]])


def ago(text: str, now: datetime, flag: str = "--since") -> str:
    """The ISO 8601 time ``text`` (a duration) before ``now``."""
    return iso(now - duration(text, flag))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], shared: Shared) -> None:
    u = sub.add_parser(
        "usage",
        parents=[shared.debug, shared.api],
        help="GPU-seconds, cost and images per tenant, model or day (the API's history store)",
        description="Usage from the API's history store (GET /v1/usage): whole UTC hours between --from (or "
        "--since ago) and --to. A key sees its own tenant's; an admin key every tenant's.",
    )
    when = u.add_mutually_exclusive_group()
    when.add_argument("--since", metavar="DURATION", default=None, help="this long ago: 12h, 7d, 4w (default: 7d)")
    when.add_argument("--from", dest="start", metavar="DATE", default=None, help="ISO 8601 date or date-time (UTC)")
    u.add_argument("--to", dest="end", metavar="DATE", default=None, help="excluded; default: now")
    u.add_argument("--group-by", choices=GROUPS, default="tenant", help="default: tenant")
    u.add_argument("--tenant", default=None, help="only this tenant's (another tenant's: an admin key)")
    u.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table", help="table (default)")
    u.set_defaults(func=usage)


def usage_table(report: dict[str, Any]) -> str:
    """The report's rows and a TOTAL row; the key column named by the grouping, cost in the report's currency."""
    rows = report.get("data") or []
    currency = report.get("currency")
    headers = (str(report.get("groupBy", "key")).upper(), *COLUMNS, f"COST ({currency})" if currency else "COST")
    totals = {f: sum(r.get(f) or 0 for r in rows) for f in (*COUNTS, "gpuSeconds", "cost")}
    lines = [
        [str(r["key"]), *(str(int(r.get(f) or 0)) for f in COUNTS), f"{r['gpuSeconds']:.1f}", f"{r['cost']:.4f}"]
        for r in rows
    ]
    lines.append(
        ["TOTAL", *(str(int(totals[f])) for f in COUNTS), f"{totals['gpuSeconds']:.1f}", f"{totals['cost']:.4f}"]
    )
    return table(headers, lines)


def usage(args: argparse.Namespace) -> int:
    shared: Shared = args.shared
    params: dict[str, str] = {"group_by": args.group_by}
    if args.since:
        params["from"] = ago(args.since, datetime.now(UTC))
    elif args.start:
        params["from"] = args.start
    if args.end:
        params["to"] = args.end
    if args.tenant:
        params["tenant"] = args.tenant
    with ApiClient(shared.api_url(args), shared.api_key(args)) as c:
        report = c.call("GET", "/v1/usage", params=params)
    if args.output == "json":
        print(json.dumps(report, indent=2))
    elif args.output == "yaml":
        import yaml

        print(str(yaml.safe_dump(report, sort_keys=False, allow_unicode=True)).rstrip("\n"))
    else:
        print(f"usage from {report.get('from')} to {report.get('to')} (whole UTC hours)", file=sys.stderr)
        print(usage_table(report))
    return 0

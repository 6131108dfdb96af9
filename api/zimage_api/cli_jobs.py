"""``zimage jobs list|get|watch|cancel``: a tenant's jobs on a running API (bulk jobs and ImageJobs alike), shown
as kubectl shows objects: a table, or ``-o json|yaml|name``. ``jobs list --history`` lists finished jobs from the
API's history store instead (``--q`` searches the prompts), those gone past their TTL included. IDs may be given
as ``job/ID`` (what ``-o name`` prints), so ``zimage jobs list -o name | xargs zimage jobs cancel`` works."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

from zimage_api.cli_client import TERMINAL_EVENTS, ApiClient
from zimage_api.cli_config import Shared
from zimage_api.cli_errors import Failure, UserError
from zimage_api.cli_output import StepProgress, job_id, render_jobs
from zimage_api.cli_usage import ago

PHASES = ["Pending", "Queued", "Running", "Succeeded", "Failed", "Cancelled"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], shared: Shared) -> None:
    j = sub.add_parser(
        "jobs", parents=[shared.debug, shared.api], help="jobs on a running API (bulk jobs and ImageJobs)"
    )
    js = j.add_subparsers(dest="jobs_command", required=True, metavar="{list,get,watch,cancel}")
    leaf = [shared.debug, shared.api, shared.output]

    jl = js.add_parser(
        "list",
        parents=leaf,
        help="your tenant's jobs: bulk jobs (newest first), then ImageJobs; --history: finished ones, newest first",
    )
    jl.add_argument("--phase", default=None, choices=PHASES)
    jl.add_argument("--model", default=None, help="only this ModelDeployment's jobs")
    jl.add_argument("--limit", type=int, default=50, help="page size (1-500)")
    jl.add_argument("--all", action="store_true", help="follow the pages (up to --max jobs)")
    jl.add_argument("--max", type=int, default=1000)
    jl.add_argument(
        "--history", action="store_true", help="finished jobs from the history store (those past their TTL too)"
    )
    jl.add_argument("--q", metavar="TEXT", default=None, help="--history: words all in the prompt")
    jl.add_argument("--since", metavar="DURATION", default=None, help="--history: finished in the last 12h, 7d, ...")
    jl.add_argument("--tenant", default=None, help="--history with an admin key: this tenant's (default: all)")
    jl.add_argument("--json", dest="output", action="store_const", const="json", help=argparse.SUPPRESS)  # -o json
    jl.set_defaults(func=jobs_list)

    jg = js.add_parser("get", parents=leaf, help="jobs by id")
    jg.add_argument("ids", nargs="+", metavar="ID")
    jg.set_defaults(func=jobs_get)

    jw = js.add_parser(
        "watch", parents=leaf, help="follow a job to its end (progress on stderr), then show it",
        description="Follow the job's event stream with a progress bar, then show the job. Exit status 0 when it "
        "succeeded, 1 when it failed or was cancelled.",
    )  # fmt: skip
    jw.add_argument("id", metavar="ID")
    jw.set_defaults(func=jobs_watch)

    jc = js.add_parser("cancel", parents=leaf, help="cancel jobs (a finished one is left as is)")
    jc.add_argument("ids", nargs="+", metavar="ID")
    jc.set_defaults(func=jobs_cancel)


def client(args: argparse.Namespace) -> ApiClient:
    shared: Shared = args.shared
    return ApiClient(shared.api_url(args), shared.api_key(args))


def show(jobs: list[dict[str, Any]], fmt: str, *, single: bool = False) -> None:
    text = render_jobs(jobs, fmt, datetime.now(UTC), single=single)
    if text:
        print(text)
    elif fmt == "table":
        print("No jobs found.", file=sys.stderr)


def follow(api: ApiClient, job_id: str, bar: StepProgress) -> dict[str, Any]:
    """Follow a job's event stream to its end; the final job (``succeeded``, ``failed`` or ``cancelled``)."""
    final: dict[str, Any] | None = None
    for kind, data in api.events(job_id):
        if kind == "progress":
            bar.step(int(data.get("step", 0)), int(data.get("totalSteps", 0)))
        elif kind == "started":
            bar.note(f"job/{job_id} Running")
        elif kind in ("retrying", "rerouted"):
            message = data.get("message")
            bar.note(f"job/{job_id} {kind}: {message}" if message else f"job/{job_id} {kind}")
        elif kind in TERMINAL_EVENTS:
            final = data
    if final is None:
        raise Failure(f"the event stream of job {job_id} ended before the job did; see zimage jobs watch {job_id}")
    progress = final.get("progress") or {}
    bar.step(int(progress.get("step", 0)), int(progress.get("totalSteps", 0)))
    return final


def jobs_list(args: argparse.Namespace) -> int:
    params: dict[str, str | int] = {"limit": args.limit}
    if args.phase:
        params["phase"] = args.phase
    if args.model:
        params["model"] = args.model
    if args.history:
        params["source"] = "history"
        if args.q:
            params["q"] = args.q
        if args.since:
            params["since"] = ago(args.since, datetime.now(UTC))
        if args.tenant:
            params["tenant"] = args.tenant
    elif args.q or args.since or args.tenant:
        raise UserError("--q, --since and --tenant list the history: add --history")
    jobs: list[dict[str, Any]] = []
    with client(args) as c:
        while True:
            page = c.call("GET", "/v1/jobs", params=params)
            jobs.extend(page["data"])
            token = page.get("nextPageToken")
            if not token or not args.all or len(jobs) >= args.max:
                break
            params["page_token"] = token
    show(jobs[: args.max], args.output)
    return 0


def jobs_get(args: argparse.Namespace) -> int:
    with client(args) as c:
        jobs = [c.call("GET", f"/v1/jobs/{job_id(ref)}") for ref in args.ids]
    show(jobs, args.output, single=len(args.ids) == 1)
    return 0


def jobs_cancel(args: argparse.Namespace) -> int:
    with client(args) as c:
        jobs = [c.call("DELETE", f"/v1/jobs/{job_id(ref)}") for ref in args.ids]
    if args.output != "table":
        show(jobs, args.output, single=len(args.ids) == 1)
        return 0
    for j in jobs:  # kubectl delete's way: one line per object
        done = "cancelled" if j["phase"] == "Cancelled" else f"already {j['phase']}, left as is"
        print(f"job/{j['id']} {done}")
    return 0


def jobs_watch(args: argparse.Namespace) -> int:
    jid = job_id(args.id)
    with client(args) as c, StepProgress(f"job/{jid}") as bar:
        final = follow(c, jid, bar)
    show([final], args.output, single=True)
    if final.get("phase") != "Succeeded":
        raise Failure(f"job {jid} {final.get('phase')}: {final.get('reason')}: {final.get('message')}")
    return 0

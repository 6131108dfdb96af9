"""``zimage workflow run -f FILE``: run an ImageWorkflow on this machine with the embedded stack (no cluster).

The file holds the ImageWorkflow and the ModelDeployments (and Secrets of provider keys) its steps name, as for
``kubectl apply``; each pool is served by local processes as its pod would be (see ``zimage_api.workflow_local``).
On a cluster, ``kubectl apply -f FILE`` and ``kubectl wait --for=condition=Succeeded iw/NAME`` do the same.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import yaml

from zimage_api.cli_config import Shared
from zimage_api.cli_errors import FAILED, UserError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], shared: Shared) -> None:
    w = sub.add_parser("workflow", parents=[shared.debug], help="run image workflows (DAGs of steps)")
    ws = w.add_subparsers(dest="workflow_command", required=True, metavar="{run}")
    r = ws.add_parser(
        "run",
        parents=[shared.debug],
        help="run a workflow file locally (embedded Redis and workers; no cluster)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("-f", "--filename", required=True, help="YAML with an ImageWorkflow and its ModelDeployments")
    r.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a workflow input; NAME=@PATH puts a local image in the store and passes its URI (repeatable)",
    )
    r.add_argument("--watch", action="store_true", help="print each step's progress as it changes")
    r.add_argument(
        "--model-source",
        default="tiny-random",
        help="what GPU pools run (default tiny-random; 'spec': each pool's own spec.model.source)",
    )
    r.add_argument("--workers", action="append", default=[], metavar="POOL=N", help="processes for a pool (default 1)")
    r.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds (default 1800)")
    r.add_argument("--state-dir", default=None, help="images and logs (default: a temporary folder kept)")
    r.add_argument("-o", "--output", choices=("summary", "json", "yaml"), default="summary")
    r.set_defaults(func=workflow_run)


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, value = v.partition("=")
        if not sep or not name:
            raise UserError(f"{what}: expected NAME=VALUE, got {v!r}")
        out[name] = value
    return out


def workflow_run(args: argparse.Namespace) -> int:
    from zimage_api.workflow_local import LOCAL_NAMESPACE, local_pools, put_input, read_file, run_workflow

    path = Path(args.filename)
    try:
        parsed = read_file(path.read_text())
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not YAML: {e}") from None
    if len(parsed.workflows) != 1:
        raise UserError(f"{path}: expected one ImageWorkflow, found {len(parsed.workflows)}")
    wf = parsed.workflows[0]
    names = {md["metadata"]["name"] for md in parsed.models}
    missing = sorted({s.get("model") for s in wf["spec"].get("steps") or []} - names)
    if missing:
        raise UserError(f"{path}: no ModelDeployment named {', '.join(map(str, missing))} in the file")
    try:
        workers = {k: int(v) for k, v in _pairs(args.workers, "--workers").items()}
    except ValueError:
        raise UserError("--workers: N must be a number") from None
    inputs = _pairs(args.input, "--input")
    state = Path(args.state_dir or tempfile.mkdtemp(prefix="zimage-workflow-")).resolve()
    source = None if args.model_source == "spec" else args.model_source
    say = (lambda line: print(f"zimage: {line}", file=sys.stderr, flush=True)) if args.watch else (lambda _: None)
    with local_pools(parsed.models, parsed.secrets, state, model_source=source, workers=workers, say=say) as (
        jobs,
        images,
    ):
        for name, value in inputs.items():
            if value.startswith("@"):
                file = Path(value[1:])
                if not file.is_file():
                    raise UserError(f"--input {name}: no file {file}")
                value = put_input(images, LOCAL_NAMESPACE, file)
            wf["spec"].setdefault("inputs", {})[name] = value
        stop = threading.Event()
        last: dict[str, Any] = {}

        def changed(current: dict[str, Any]) -> None:
            if args.watch:
                line = progress_line(current)
                if line != last.get("line"):
                    last["line"] = line
                    print(line, file=sys.stderr, flush=True)

        try:
            done = run_workflow(wf, jobs, timeout=args.timeout, on_change=changed, stop=stop)
        except TimeoutError as e:
            raise UserError(str(e)) from None
        except KeyboardInterrupt:
            stop.set()
            done = run_workflow(wf, jobs, timeout=30, stop=stop)
    show(done, args.output, state)
    return 0 if (done.get("status") or {}).get("phase") == "Succeeded" else FAILED


def progress_line(wf: dict[str, Any]) -> str:
    status = wf.get("status") or {}
    steps = ", ".join(
        f"{s['name']} {s.get('phase', 'Pending')}"
        + (f" {s.get('succeeded', 0)}/{s['count']}" if s.get("count") not in (None, 1) else "")
        for s in status.get("steps") or []
    )
    summary = (status.get("progress") or {}).get("summary", "")
    return f"{wf['metadata'].get('name')}: {status.get('phase')} {summary} [{steps}]"


def show(wf: dict[str, Any], output: str, state: Path) -> None:
    status = wf.get("status") or {}
    if output == "json":
        print(json.dumps(wf, indent=2))
        return
    if output == "yaml":
        print(yaml.safe_dump(wf, sort_keys=False))
        return
    print(f"{wf['metadata'].get('name')}: {status.get('phase')} in {status.get('duration') or '-'}")
    if status.get("message"):
        print(f"  {status['message']}")
    for s in status.get("steps") or []:
        for inst in s.get("instances") or []:
            label = s["name"] + (f"[{inst['index']}]" if s.get("fannedOut") else "")
            out = inst.get("text") or " ".join(inst.get("images") or []) or inst.get("message") or ""
            routed = f" (via {inst['routedTo']})" if inst.get("routedTo") else ""
            print(f"  {label:<16} {inst.get('phase', ''):<10} {inst.get('seconds') or 0:>7.2f}s{routed}  {out[:200]}")
    print(f"  logs and images: {state}")

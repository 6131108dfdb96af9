"""How ``zimage`` shows things: jobs as kubectl shows objects (a table, or ``-o json|yaml|name``), and a job's
denoising steps as a progress bar (rich) on stderr, so stdout carries only what a script reads."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.progress import TaskID

JOB_COLUMNS = ("ID", "MODE", "PHASE", "PROGRESS", "IMAGES", "MODEL", "AGE")


def age(created: str | None, now: datetime) -> str:
    """kubectl's AGE: ``42s``, ``17m``, ``5h``, ``3d``; ``<unknown>`` without a time."""
    if not created:
        return "<unknown>"
    try:
        then = datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        return "<unknown>"
    seconds = max(0, int((now - (then if then.tzinfo else then.replace(tzinfo=UTC))).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 120 * 60:
        return f"{seconds // 60}m"
    if seconds < 48 * 3600:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def job_row(job: dict[str, Any], now: datetime) -> list[str]:
    progress = job.get("progress") or {}
    total = progress.get("totalSteps") or 0
    return [
        str(job.get("id", "")),
        str(job.get("mode", "imagejob")),
        str(job.get("phase", "")),
        f"{progress.get('step', 0)}/{total}" if total else "-",
        str(len(job.get("images") or [])),
        str(job.get("model", "")),
        age(job.get("createdAt"), now),
    ]


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns as kubectl aligns them: left-aligned, three spaces apart, no borders."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]
    lines = [
        "   ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in (headers, *rows)
    ]
    return "\n".join(lines)


def render_jobs(jobs: list[dict[str, Any]], fmt: str, now: datetime, *, single: bool = False) -> str:
    """``single``: one job asked for by id: json/yaml show the object itself, not a list of one."""
    if fmt == "name":
        return "\n".join(f"job/{j['id']}" for j in jobs)
    doc: Any = jobs[0] if single and len(jobs) == 1 else {"object": "list", "data": jobs}
    if fmt == "json":
        return json.dumps(doc, indent=2)
    if fmt == "yaml":
        import yaml

        return str(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)).rstrip("\n")
    if not jobs:
        return ""
    return table(JOB_COLUMNS, [job_row(j, now) for j in jobs])


def job_id(ref: str) -> str:
    """``job/ID`` (what ``-o name`` prints, so its output can be piped back) or ``ID``."""
    return ref.removeprefix("job/")


class StepProgress:
    """One job's denoising steps as a bar on stderr: live on a terminal; elsewhere (a pipe, a log) only the
    notes as they come and the bar's last state. ``total`` can change (strength shortens an edit's steps).
    The bar shows from the first note or step on: an error before the job is followed is its only line."""

    def __init__(self, description: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True, highlight=False),
        )
        self.description = description
        self.task: TaskID | None = None  # added when first shown: adding it draws the bar

    def __enter__(self) -> StepProgress:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.task is not None:
            self.progress.stop()

    def _shown(self) -> TaskID:
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task(self.description, total=None)
        return self.task

    def note(self, text: str) -> None:
        """A line above the bar."""
        self._shown()
        self.progress.console.print(text, markup=False, soft_wrap=True)

    def step(self, step: int, total: int) -> None:
        task = self._shown()
        if total:
            self.progress.update(task, completed=step, total=total)

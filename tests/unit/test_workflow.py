"""The pure ImageWorkflow planner: (workflow, its step jobs, now) -> jobs to create/cancel, status."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from zimage_operator import workflow as wfp
from zimage_operator.workflow_types import STEP_LABEL, WORKFLOW_LABEL, ImageWorkflowSpec

T0 = datetime(2026, 12, 6, 12, 0, 0, tzinfo=UTC)


def product(**extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": "zimage.dev/v1alpha1",
        "kind": "ImageWorkflow",
        "metadata": {"name": "shoe", "namespace": "shop", "uid": "wf-uid", "generation": 1},
        "spec": {
            "inputs": {"product": "s3://b/shoe.png", "mask": "s3://b/shoe-mask.png", "idea": "a red shoe"},
            "steps": [
                {"name": "enhance", "model": "llm", "params": {"prompt": "Improve: {{ inputs.idea }}"}},
                {"name": "background", "model": "z-image", "params": {"prompt": "{{ steps.enhance.text }}"}},
                {
                    "name": "compose",
                    "model": "compose",
                    "params": {
                        "task": "inpaint",
                        "inputImage": "{{ steps.background.image }}",
                        "maskImage": "{{ inputs.mask }}",
                        "args": {"overlay": "{{ inputs.product }}", "scale": 0.5},
                    },
                },
                {
                    "name": "resize",
                    "model": "resize",
                    "forEach": [{"w": 512, "h": 512}, {"w": 256, "h": 128}],
                    "params": {
                        "task": "image-to-image",
                        "inputImage": "{{ steps.compose.image }}",
                        "width": "{{ item.w }}",
                        "height": "{{ item.h }}",
                    },
                },
            ],
            **extra,
        },
    }


class Cluster:
    """The step jobs as a cluster would hold them; plans are applied as the operator applies them."""

    def __init__(self, wf: dict[str, Any], models: set[str] | None = None) -> None:
        self.wf = wf
        self.jobs: dict[str, dict[str, Any]] = {}
        self.cancelled: list[str] = []
        self.events: list[tuple[str, str, str]] = []
        self.models = models
        self.now = T0

    def step(self, seconds: float = 1.0) -> wfp.Plan:
        self.now += timedelta(seconds=seconds)
        exists = None if self.models is None else self.models.__contains__
        p = wfp.plan(self.wf, self.jobs, self.now, exists)
        for body in p.create:
            self.jobs.setdefault(body["metadata"]["name"], copy.deepcopy(body))
        for name in p.cancel:
            self.cancelled.append(name)
            self.jobs[name].setdefault("status", {})["phase"] = "Cancelled"
        if p.status is not None:
            self.wf["status"] = p.status
        self.events += p.events
        return p

    def finish(self, name: str, phase: str = "Succeeded", **status: Any) -> None:
        self.jobs[name]["status"] = {"phase": phase, "finishedAt": wfp.iso(self.now), **status}

    def succeed_image(self, name: str, n: int = 1) -> None:
        self.finish(name, results=[{"uri": f"file:///img/{name}/{i}.png"} for i in range(n)])

    @property
    def status(self) -> dict[str, Any]:
        return self.wf["status"]

    def step_status(self, name: str) -> dict[str, Any]:
        return next(s for s in self.status["steps"] if s["name"] == name)


def test_the_product_pipeline_runs_step_by_step_with_resolved_references() -> None:
    c = Cluster(product())
    p = c.step()
    assert [b["metadata"]["name"] for b in p.create] == ["shoe-enhance"]
    job = p.create[0]
    assert job["spec"]["prompt"] == "Improve: a red shoe" and job["spec"]["model"] == "llm"
    assert job["metadata"]["labels"] == {WORKFLOW_LABEL: "shoe", STEP_LABEL: "enhance"}
    assert job["metadata"]["ownerReferences"][0]["uid"] == "wf-uid"
    assert c.status["phase"] == "Running" and c.status["progress"]["summary"] == "0/4"
    assert not c.step().create  # nothing new until the job ends, and nothing changed to write

    c.finish("shoe-enhance", text="a glossy red shoe on marble")
    p = c.step()
    assert [b["spec"]["prompt"] for b in p.create] == ["a glossy red shoe on marble"]
    assert c.step_status("enhance")["instances"][0]["text"] == "a glossy red shoe on marble"
    c.succeed_image("shoe-background")
    p = c.step()
    [compose] = p.create
    assert compose["spec"]["inputImage"] == "file:///img/shoe-background/0.png"
    assert compose["spec"]["args"] == {"overlay": "s3://b/shoe.png", "scale": 0.5}
    assert compose["spec"]["maskImage"] == "s3://b/shoe-mask.png"
    c.succeed_image("shoe-compose")
    p = c.step()
    assert sorted((b["metadata"]["name"], b["spec"]["width"], b["spec"]["height"]) for b in p.create) == [
        ("shoe-resize-0", 512, 512),
        ("shoe-resize-1", 256, 128),
    ]
    c.succeed_image("shoe-resize-0")
    c.step()
    assert c.status["phase"] == "Running" and c.step_status("resize")["succeeded"] == 1
    c.succeed_image("shoe-resize-1")
    c.step()
    assert c.status["phase"] == "Succeeded"
    assert c.status["progress"] == {
        "stepsDone": 4,
        "stepsTotal": 4,
        "jobsDone": 5,
        "jobsTotal": 5,
        "summary": "4/4",
    }
    assert {c["type"]: c["status"] for c in c.status["conditions"]}["Succeeded"] == "True"
    assert [i["images"] for i in c.step_status("resize")["instances"]] == [
        ["file:///img/shoe-resize-0/0.png"],
        ["file:///img/shoe-resize-1/0.png"],
    ]
    assert c.status["finishedAt"] and c.events[-1][1] == wfp.Reason.COMPLETED
    assert wfp.plan(c.wf, c.jobs, c.now + timedelta(seconds=5)).status is None  # final: nothing moves


def mapped(n: int) -> dict[str, Any]:
    return {
        "metadata": {"name": "batch", "namespace": "ns", "uid": "u"},
        "spec": {
            "inputs": {"ideas": [f"idea {i}" for i in range(n)]},
            "steps": [
                {
                    "name": "enhance",
                    "model": "llm",
                    "forEach": "{{ inputs.ideas }}",
                    "params": {"prompt": "{{ item }}"},
                },
                {
                    "name": "bg",
                    "model": "gpu",
                    "forEach": "{{ steps.enhance }}",
                    "params": {"prompt": "{{ item.text }}"},
                },
                {
                    "name": "sheet",
                    "model": "fn",
                    "params": {"prompt": "sheet", "args": {"tiles": "{{ steps.bg.all.images }}"}},
                },
            ],
        },
    }


def test_a_mapped_step_starts_each_job_when_its_own_predecessor_is_done() -> None:
    c = Cluster(mapped(3))
    assert sorted(b["metadata"]["name"] for b in c.step().create) == [
        "batch-enhance-0",
        "batch-enhance-1",
        "batch-enhance-2",
    ]
    c.finish("batch-enhance-1", text="one")
    p = c.step()
    assert [(b["metadata"]["name"], b["spec"]["prompt"]) for b in p.create] == [("batch-bg-1", "one")]
    c.finish("batch-enhance-0", text="zero")
    c.finish("batch-enhance-2", text="two")
    assert sorted(b["spec"]["prompt"] for b in c.step().create) == ["two", "zero"]
    for i in (0, 1):
        c.succeed_image(f"batch-bg-{i}")
    assert not c.step().create  # the fan-in waits for all of bg
    c.succeed_image("batch-bg-2", n=2)
    [sheet] = c.step().create
    assert sheet["spec"]["args"]["tiles"] == [
        "file:///img/batch-bg-0/0.png",
        "file:///img/batch-bg-1/0.png",
        "file:///img/batch-bg-2/0.png",
        "file:///img/batch-bg-2/1.png",
    ]


def test_max_parallel_bounds_the_unfinished_jobs() -> None:
    wf = mapped(10)
    wf["spec"]["maxParallel"] = 4
    c = Cluster(wf)
    assert len(c.step().create) == 4
    assert not c.step().create
    c.finish("batch-enhance-0", text="x")
    names = sorted(b["metadata"]["name"] for b in c.step().create)
    assert len(names) == 1  # one finished, one more may start: the next enhance or bg-0


@pytest.mark.parametrize(
    ("steps", "needle"),
    [
        (
            [
                {"name": "a", "model": "m", "dependsOn": ["b"], "params": {"prompt": "x"}},
                {"name": "b", "model": "m", "params": {"prompt": "{{ steps.a.text }}"}},
            ],
            "dependency cycle a -> b -> a",
        ),
        ([{"name": "a", "model": "m", "params": {"prompt": "{{ steps.nope.text }}"}}], "no step named 'nope'"),
        ([{"name": "a", "model": "m", "params": {"prompt": "{{ inputs.nope }}"}}], "names no input"),
        ([{"name": "a", "model": "m", "params": {"prompt": "{{ item }}"}}], "outside a forEach step"),
        ([{"name": "a", "model": "m", "params": {"model": "other", "prompt": "x"}}], "set by the workflow"),
        ([{"name": "a", "model": "m", "params": {"promt": "x"}}], "params.promt: not an ImageJob field"),
    ],
)
def test_impossible_workflows_fail_at_admission_with_the_reason(steps: list[dict[str, Any]], needle: str) -> None:
    c = Cluster({"metadata": {"name": "w", "namespace": "n"}, "spec": {"steps": steps}})
    p = c.step()
    assert not p.create
    assert c.status["phase"] == "Failed"
    accepted = next(x for x in c.status["conditions"] if x["type"] == "Accepted")
    assert accepted["status"] == "False" and accepted["reason"] == "InvalidSpec"
    assert needle in accepted["message"], accepted["message"]


def test_a_missing_model_keeps_it_pending_until_it_appears() -> None:
    c = Cluster(product(), models={"llm", "z-image", "compose"})
    p = c.step()
    assert not p.create and p.requeue
    assert c.status["phase"] == "Pending" and "resize" in c.status["message"]
    assert c.step().status is None  # same answer, no write
    c.models.add("resize")  # type: ignore[union-attr]
    assert [b["metadata"]["name"] for b in c.step().create] == ["shoe-enhance"]


def test_a_failed_job_is_retried_then_fails_the_workflow_and_cancels_the_rest() -> None:
    wf = mapped(2)
    wf["spec"]["steps"][0]["retries"] = 1
    c = Cluster(wf)
    c.step()
    c.finish("batch-enhance-0", "Failed", message="provider said no")
    p = c.step()
    assert [b["metadata"]["name"] for b in p.create] == ["batch-enhance-0-r1"]
    assert any(e[1] == "StepRetrying" for e in c.events)
    c.finish("batch-enhance-0-r1", "Failed", message="provider said no again")
    p = c.step()
    assert p.cancel == ["batch-enhance-1"] and not p.create
    assert c.status["phase"] == "Failed" and "provider said no again" in c.status["message"]
    phases = {s["name"]: s["phase"] for s in c.status["steps"]}
    assert phases == {"enhance": "Failed", "bg": "Skipped", "sheet": "Skipped"}
    assert c.step().status is None


def test_cancel_cancels_running_jobs_and_skips_the_rest() -> None:
    c = Cluster(product())
    c.step()
    c.wf["spec"]["cancel"] = True
    p = c.step()
    assert p.cancel == ["shoe-enhance"]
    assert c.status["phase"] == "Cancelled"
    assert [s["phase"] for s in c.status["steps"]] == ["Cancelled", "Skipped", "Skipped", "Skipped"]


def test_a_fallback_move_is_recorded_with_its_reason() -> None:
    c = Cluster(product())
    c.step()
    c.jobs["shoe-enhance"]["status"] = {
        "phase": "Queued",
        "routedTo": "llm-b",
        "message": "moved to the fallback model llm-b: its provider was unavailable",
    }
    c.step()
    inst = c.step_status("enhance")["instances"][0]
    assert inst["routedTo"] == "llm-b" and "unavailable" in inst["message"]
    assert [e for e in c.events if e[1] == "StepRerouted"]
    moved = {"type": "Queued", "reason": "FallbackModel", "message": "moved to the fallback model llm-b: why"}
    c.finish("shoe-enhance", text="t", routedTo="llm-b", message="answered", conditions=[moved])
    c.step()
    inst = c.step_status("enhance")["instances"][0]
    assert inst["routedTo"] == "llm-b" and inst["message"] == "moved to the fallback model llm-b: why"


def test_a_job_never_seen_is_created_again_after_a_while() -> None:
    c = Cluster(product())
    c.step()
    del c.jobs["shoe-enhance"]
    assert not c.step(5).create
    assert [b["metadata"]["name"] for b in c.step(wfp.RECREATE_AFTER_SECONDS).create] == ["shoe-enhance"]


def test_a_reference_that_cannot_resolve_fails_the_step_with_a_message() -> None:
    wf = product()
    wf["spec"]["steps"][1]["params"]["prompt"] = "{{ steps.enhance.image }}"  # a text step has no image
    c = Cluster(wf)
    c.step()
    c.finish("shoe-enhance", text="words")
    p = c.step()
    assert not p.create
    assert c.status["phase"] == "Failed" and "has no value" in c.status["message"]


def test_invalid_job_params_fail_the_step_not_the_operator() -> None:
    wf = product()
    wf["spec"]["steps"][3]["forEach"] = [{"w": 100, "h": 64}]  # not a multiple of 16
    c = Cluster(wf)
    c.step()
    c.finish("shoe-enhance", text="t")
    c.step()
    c.succeed_image("shoe-background")
    c.step()
    c.succeed_image("shoe-compose")
    c.step()
    assert c.status["phase"] == "Failed" and "params.width" in c.status["message"]


def test_topological_order_and_cycles() -> None:
    spec = ImageWorkflowSpec.model_validate(product()["spec"])
    assert [s.name for s in wfp.topological(spec)] == ["enhance", "background", "compose", "resize"]
    assert wfp.find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert wfp.find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_a_spec_edit_after_admission_fails_the_workflow() -> None:
    c = Cluster(product())
    c.step()
    c.wf["spec"]["inputs"]["idea"] = "a blue shoe"  # CEL cannot see inside inputs
    p = c.step()
    assert p.cancel == ["shoe-enhance"]
    assert c.status["phase"] == "Failed" and "spec changed" in c.status["message"]
    assert [s["phase"] for s in c.status["steps"]] == ["Cancelled", "Skipped", "Skipped", "Skipped"]
    c2 = Cluster(product())
    c2.step()
    c2.wf["spec"]["cancel"] = True  # the one edit allowed
    c2.step()
    assert c2.status["phase"] == "Cancelled"


def test_a_step_mapped_over_another_waits_for_its_own_job_even_without_using_it() -> None:
    wf = mapped(2)
    wf["spec"]["steps"][1]["params"] = {"prompt": "job {{ index }}"}  # neither item nor enhance's outputs used
    c = Cluster(wf)
    c.step()
    assert not c.step().create
    c.finish("batch-enhance-1", text="x")
    assert [b["metadata"]["name"] for b in c.step().create] == ["batch-bg-1"]

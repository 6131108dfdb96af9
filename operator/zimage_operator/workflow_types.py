"""The ImageWorkflow custom resource's schema (``crds/imageworkflow.yaml`` is generated from it).

A workflow is a DAG of steps. Each step runs as an ImageJob on a ModelDeployment of any backend (a GPU pool, a
remote provider, a function pool), owned by the workflow, so ``kubectl get ij`` shows every step's job. A step's
``params`` are the ImageJob's generation fields (``prompt``, ``width``, ``inputImage``, ``args``, ...) in which
strings may refer to workflow inputs and to earlier steps' outputs (``zimage_operator.workflow`` resolves them).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, JsonValue, WithJsonSchema

from zimage_operator.types import Condition
from zimage_queue.message import CamelModel, Priority

IMAGEWORKFLOW_PLURAL = "imageworkflows"
# The label every step's ImageJob carries: the workflow it belongs to (and its step).
WORKFLOW_LABEL = "zimage.dev/workflow"
STEP_LABEL = "zimage.dev/workflow-step"

MAX_STEPS = 32
MAX_ITEMS = 256  # instances of one fanned-out step
STEP_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

WorkflowPhase = Literal["Pending", "Running", "Succeeded", "Failed", "Cancelled"]
StepPhase = Literal["Pending", "Running", "Succeeded", "Failed", "Cancelled", "Skipped"]

# Anything JSON (a structural schema says so with x-kubernetes-preserve-unknown-fields; the operator validates).
AnyJson = Annotated[JsonValue, WithJsonSchema({"x-kubernetes-preserve-unknown-fields": True})]


class WorkflowStep(CamelModel):
    name: str = Field(min_length=1, max_length=40, pattern=STEP_NAME, description="The step's name, unique here.")
    model: str = Field(
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="The ModelDeployment (any backend) that runs this step's jobs, in the workflow's namespace.",
    )
    depends_on: list[Annotated[str, Field(max_length=40)]] = Field(
        default_factory=list,
        max_length=MAX_STEPS,
        description="Steps that must have succeeded first. A step whose params or forEach name another step "
        "depends on it without saying so.",
    )
    for_each: AnyJson | None = Field(
        None,
        description="Fan-out: a list of items (one job each; {{ item }} and {{ index }} in params), or a "
        "reference: '{{ inputs.NAME }}' (a list input), '{{ steps.X }}' (one job per job of step X, each starting "
        "as soon as its own X job succeeded; {{ item.text }}, {{ item.image }}), '{{ steps.X.all.images }}' or "
        "'{{ steps.X.all.texts }}' (every output of X, once all of X succeeded).",
    )
    params: dict[Annotated[str, Field(max_length=63)], AnyJson] = Field(
        default_factory=dict,
        max_length=32,
        description="The step's ImageJob fields (prompt, width, height, task, inputImage, maskImage, args, steps, "
        "seed, numImages, ...); strings may hold {{ inputs.NAME }}, {{ steps.X.text }}, {{ steps.X.image }}, "
        "{{ steps.X.images }}, {{ steps.X.all.texts }}, {{ steps.X.all.images }}, {{ item }}, {{ index }}.",
    )
    retries: int = Field(0, ge=0, le=10, description="New attempts (a new ImageJob each) after a failed one.")
    timeout_seconds: int | None = Field(None, ge=1, le=86400, description="Each attempt's timeout.")
    priority: Priority | None = Field(None, description="Queue priority of the step's jobs (default: the workflow's).")


class ImageWorkflowSpec(CamelModel):
    inputs: dict[Annotated[str, Field(max_length=63)], AnyJson] = Field(
        default_factory=dict, max_length=64, description="Values the steps refer to as {{ inputs.NAME }}."
    )
    steps: list[WorkflowStep] = Field(min_length=1, max_length=MAX_STEPS, description="The DAG's steps.")
    priority: Priority = Field("normal", description="Queue priority of the steps' jobs.")
    max_parallel: int = Field(64, ge=1, le=MAX_ITEMS, description="At most this many step jobs unfinished at once.")
    cancel: bool = Field(False, description="Set to true to cancel the workflow and its running steps.")
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the workflow (and its step jobs) this long after it finished."
    )


class StepInstance(CamelModel):
    """One job of a step (one per forEach item), across its attempts."""

    index: int = 0
    job: str = Field("", description="The ImageJob of the current attempt.")
    attempt: int = 0
    phase: StepPhase = "Pending"
    text: str | None = Field(None, max_length=32768, description="What a text step answered.")
    images: list[str] | None = Field(None, description="The URIs of the images it made.")
    routed_to: str | None = Field(None, description="The fallback ModelDeployment that served it, if any.")
    message: str | None = Field(None, max_length=4096)
    started_at: str | None = None
    finished_at: str | None = None
    seconds: float | None = Field(None, description="From the job's creation to its end.")


class StepStatus(CamelModel):
    name: str
    phase: StepPhase = "Pending"
    model: str = ""
    count: int | None = Field(None, description="How many jobs the step has (known once its forEach resolved).")
    fanned_out: bool | None = Field(None, description="Whether the step has a forEach.")
    succeeded: int = 0
    instances: list[StepInstance] = Field(default_factory=list)
    message: str | None = Field(None, max_length=4096)
    started_at: str | None = None
    finished_at: str | None = None


class WorkflowProgress(CamelModel):
    steps_done: int = 0
    steps_total: int = 0
    jobs_done: int = 0
    jobs_total: int = 0
    summary: str = Field("", description="done/total steps, for the Progress printer column.")


class ImageWorkflowStatus(CamelModel):
    phase: WorkflowPhase | None = None
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None
    progress: WorkflowProgress | None = None
    steps: list[StepStatus] = Field(default_factory=list)
    started_at: str | None = None
    finished_at: str | None = None
    duration: str | None = None
    message: str | None = Field(None, max_length=32768)
    spec_digest: str | None = Field(None, description="A hash of the spec as admitted (cancel aside).")


# CEL (checked by the API server before anything is stored): unique step names, dependencies that exist and are not
# the step itself, and a spec that only changes by setting cancel. Cycles longer than one step are found by the
# operator's admission (Failed/InvalidSpec), since CEL cannot walk a graph.
SPEC_RULES: list[dict[str, Any]] = [
    {
        "rule": "self.steps.all(s, self.steps.exists_one(t, t.name == s.name))",
        "message": "steps: names must be unique",
    },
    {
        "rule": "self.steps.all(s, !has(s.dependsOn) || s.dependsOn.all(d, d != s.name && "
        "self.steps.exists(t, t.name == d)))",
        "message": "steps[].dependsOn: every name must be another step of this workflow",
    },
    {
        # (CEL cannot see inside inputs and params, which hold any JSON: the operator checks status.specDigest)
        "rule": "self == oldSelf || (self.cancel && self.steps == oldSelf.steps)",
        "message": "spec is immutable once created, except setting cancel: true",
    },
    {"rule": "!oldSelf.cancel || self.cancel", "message": "spec.cancel cannot be unset"},
]
# On the whole object: the workflow's name is the value of its step jobs' zimage.dev/workflow label.
OBJECT_RULES: list[dict[str, Any]] = [
    {"rule": "size(self.metadata.name) <= 63", "message": "metadata.name: at most 63 characters (a label value)"},
]

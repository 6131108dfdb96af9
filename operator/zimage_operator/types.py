"""The custom resources' schemas, written once.

``crds/*.yaml`` is generated from these models (``python -m zimage_operator.crdgen``) and a test keeps the
committed YAML equal to the generated one; the operator and the API parse specs with the same models.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, cast

from pydantic import ConfigDict, Field, JsonValue

from zimage_queue.message import (
    DEFAULT_MAX_RETRIES,
    MAX_LORAS_PER_JOB,
    URI_PATTERN,
    VARIANT_DEFAULTS,
    AdapterSpec,
    CamelModel,
    GenerationParams,
    LoraRef,
    Priority,
    ResultImage,
    VariantDefaults,
    variant_help,
)

GROUP = "zimage.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
IMAGEJOB_PLURAL = "imagejobs"
MODELDEPLOYMENT_PLURAL = "modeldeployments"

# Set by the REST API on the jobs it creates; kubectl users' jobs belong to their namespace.
TENANT_LABEL = "zimage.dev/tenant"


def tenant_of(meta: dict[str, Any]) -> str:
    """A job's tenant: the label the API sets, else (a job made with kubectl) its namespace."""
    return str((meta.get("labels") or {}).get(TENANT_LABEL) or meta.get("namespace") or "")


Phase = Literal["Pending", "Queued", "Running", "Succeeded", "Failed", "Cancelled"]
TERMINAL_PHASES: frozenset[str] = frozenset({"Succeeded", "Failed", "Cancelled"})
Variant = Literal["turbo", "base", "edit", "omni"]


class Cond:
    """Condition types."""

    ACCEPTED = "Accepted"
    QUEUED = "Queued"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"


class Reason:
    """Condition reasons (CamelCase, as Kubernetes conventions ask)."""

    MODEL_NOT_FOUND = "ModelNotFound"
    INVALID_SPEC = "InvalidSpec"
    GPU_QUOTA_EXCEEDED = "GPUQuotaExceeded"
    UNKNOWN_ADAPTER = "UnknownAdapter"
    TOO_MANY_ADAPTERS = "TooManyAdapters"
    UNSUPPORTED_TASK = "UnsupportedTask"
    ENQUEUED = "Enqueued"
    STARTED = "Started"
    COMPLETED = "Completed"
    TIMEOUT = "Timeout"
    RETRYING = "Retrying"
    WORKER_ERROR = "WorkerError"
    DELETED = "Deleted"
    FALLBACK = "FallbackModel"
    CANCELLED = "Cancelled"
    SPEC_CHANGED = "SpecChanged"


class ImageJobSpec(GenerationParams):
    # A user's spec, unlike the wire message built from it: a misspelt field is an error, not silently ignored.
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Name of a ModelDeployment in the same namespace.",
    )
    priority: Priority = Field("normal", description="Queue priority.")
    timeout_seconds: int | None = Field(
        None, ge=1, le=86400, description="Fail the job (reason Timeout) if it has not finished by then."
    )
    max_retries: int = Field(DEFAULT_MAX_RETRIES, ge=0, le=20, description="Retries after a failed attempt.")
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the ImageJob this long after it finished."
    )


class Condition(CamelModel):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(max_length=1024)
    message: str = Field("", max_length=32768)
    last_transition_time: str
    observed_generation: int | None = None


class Progress(CamelModel):
    step: int = 0
    total_steps: int = 0
    summary: str = Field("", description="step/totalSteps, for the Progress printer column.")


class ImageJobStatus(CamelModel):
    phase: Phase | None = None
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None
    attempts: int | None = None
    worker: str | None = None
    progress: Progress | None = None
    seed: int | None = Field(None, description="The seed used (chosen when the spec gave none).")
    steps: int | None = Field(None, description="The steps used (the spec's, or the variant's default).")
    queued_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    queue_seconds: float | None = None
    run_seconds: float | None = None
    duration: str | None = Field(None, description="Run time of the finished job, for the Duration column.")
    results: list[ResultImage] | None = None
    text: str | None = Field(None, description="What a text step answered (a remote chat model's reply).")
    routed_to: str | None = Field(None, description="The fallback ModelDeployment the job was moved to, if any.")
    adapters: list[LoraRef] | None = Field(
        None, description="The LoRA adapters it runs with (spec.loras), each scale resolved (the adapter's default)."
    )
    message: str | None = Field(None, max_length=32768)
    spec_digest: dict[str, str] | None = Field(
        None, description="A short hash per spec field as admitted: a later spec edit is reported by field."
    )


# A DNS-1123 name, as Kubernetes requires for object references (PVCs, ServiceAccounts, PriorityClasses).
_DNS_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_WORKER_IMAGE = "ghcr.io/zimage-dev/zimage-worker:0.1.0"
# The forwarders of remote pools run the operator's image (its zimage-forwarder entry point); the chart sets
# ZIMAGE_FORWARDER_IMAGE to the image it installs the operator from.
DEFAULT_FORWARDER_IMAGE = "ghcr.io/zimage-dev/zimage-operator:0.1.0"
MAX_SCALING_HISTORY = 10
# The worker's settings the operator owns: a user's env may not override where it reads jobs from or who it is.
RESERVED_ENV = frozenset(
    {
        "ZIMAGE_REDIS_URL",
        "ZIMAGE_QUEUE",
        "ZIMAGE_WORKER_NAME",
        "MODELS_DIR",
        "ZIMAGE_HTTP_PORT",
        "ZIMAGE_ADAPTERS",  # spec.adapters
        "ZIMAGE_MAX_RESIDENT_ADAPTERS",
        "ZIMAGE_ADAPTER_CACHE_DIR",
    }
)
# ... and per backend: what selects a function pool's engine, and a remote pool's provider settings (also any
# ZIMAGE_REMOTE_* variable).
FUNCTION_ENV = frozenset({"ZIMAGE_ENGINE", "ZIMAGE_FUNCTION"})
REMOTE_ENV = frozenset({"ZIMAGE_CONCURRENCY_PER_REPLICA", "ZIMAGE_FALLBACKS"})
REMOTE_ENV_PREFIX = "ZIMAGE_REMOTE_"


class ModelSource(CamelModel):
    variant: Variant = Field(
        "turbo", description=f"Model variant: sets the generation defaults and what jobs it accepts. {variant_help()}."
    )
    source: str = Field(
        "Tongyi-MAI/Z-Image-Turbo",
        min_length=1,
        max_length=1024,
        description="Hub id, a path under MODELS_DIR, or tiny-random.",
    )
    revision: str | None = Field(None, max_length=256, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="Weights dtype.")


class Scaling(CamelModel):
    mode: Literal["builtin", "external"] = Field(
        "builtin",
        description="builtin: the operator scales on queue length. external: spec.replicas is set by an HPA or KEDA "
        "through the scale subresource.",
    )
    min_replicas: int = Field(0, ge=0, le=1000, description="0 lets an idle pool scale to zero.")
    max_replicas: int = Field(4, ge=1, le=1000)
    target_queue_per_replica: int = Field(
        4, ge=1, le=10000, description="Queued plus in-flight jobs one replica is expected to absorb."
    )
    activation_queue_length: int = Field(
        1, ge=1, le=10000, description="Queued jobs needed to wake a pool that is at zero replicas."
    )
    scale_up_stabilization_seconds: int = Field(
        0, ge=0, le=3600, description="Higher demand must last this long before scaling up (0: at once)."
    )
    scale_down_delay_seconds: int = Field(
        60, ge=0, le=86400, description="Lower demand must last this long before scaling down."
    )
    poll_interval_seconds: int = Field(1, ge=1, le=300, description="How often the queue is looked at.")

    def cross_field_errors(self) -> list[str]:
        if self.min_replicas > self.max_replicas:
            return [f"spec.scaling: minReplicas ({self.min_replicas}) exceeds maxReplicas ({self.max_replicas})"]
        return []


class Batching(CamelModel):
    max_batch_size: int = Field(1, ge=1, le=64, description="Jobs with equal parameters a worker may run together.")
    max_wait_milliseconds: int = Field(0, ge=0, le=10000, description="How long a worker waits to fill a batch.")


class Acceleration(CamelModel):
    """How a worker prepares its model before it reports ready."""

    warmup: bool = Field(True, description="Run a throwaway generation (and one full batch) before /readyz.")
    compile: bool = Field(
        False,
        description="torch.compile the transformer's repeated blocks (regional: seconds, during the warm-up).",
    )
    attention_backend: str | None = Field(
        None,
        max_length=64,
        pattern=r"^[a-z0-9_]+$",
        description="diffusers attention backend (e.g. flash, _native_cudnn); default: PyTorch SDPA.",
    )


class Cache(CamelModel):
    """Where workers keep model weights. Neither claim nor size: an emptyDir, so each pod downloads its own copy."""

    existing_claim: str | None = Field(
        None, max_length=253, pattern=_DNS_NAME, description="A PersistentVolumeClaim to use as is (not managed)."
    )
    size: str | None = Field(
        None,
        max_length=64,
        pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$",
        description="Size of a PersistentVolumeClaim the operator creates (<name>-model-cache).",
    )
    storage_class_name: str | None = Field(None, max_length=253, description="Storage class of the created claim.")
    access_modes: list[Literal["ReadWriteOnce", "ReadWriteMany", "ReadOnlyMany", "ReadWriteOncePod"]] = Field(
        ["ReadWriteOnce"],
        min_length=1,
        max_length=4,
        description="Of the created claim. Workers on several nodes sharing one cache need ReadWriteMany.",
    )
    preload: bool = Field(
        False, description="Download the model into the cache with a Job; workers then mount it read-only."
    )
    mount_path: str = Field("/models", max_length=1024, pattern=r"^/[^:]+$", description="MODELS_DIR in the worker.")

    def cross_field_errors(self) -> list[str]:
        errors = []
        if self.existing_claim and self.size:
            errors.append("spec.cache: set existingClaim or size, not both")
        if self.storage_class_name and not self.size:
            errors.append("spec.cache.storageClassName: only used with size")
        if self.preload and not (self.existing_claim or self.size):
            errors.append("spec.cache.preload: needs a persistent cache (existingClaim or size)")
        if self.mount_path.rstrip("/") in ("", "/tmp"):
            errors.append(f"spec.cache.mountPath: {self.mount_path} is taken")
        return errors


class Fallback(CamelModel):
    model: str = Field(
        min_length=1,
        max_length=253,
        pattern=_DNS_NAME,
        description="ModelDeployment in the same namespace that takes jobs this pool has not started in time.",
    )
    after_seconds: int = Field(300, ge=1, le=86400, description="How long a job may wait here before it moves.")


Backend = Literal["diffusers", "remote", "function"]
# The steps a function pool runs without an image of the user's: entry point builtin:<name>.
BUILTIN_STEPS = ("compose", "resize", "crop", "pad", "convert", "watermark")
MIN_PROVIDER_KEYS, MAX_PROVIDER_KEYS = 1, 100
MAX_FALLBACKS = 5
_PY_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = rf"{_PY_NAME}(\.{_PY_NAME})*"


class RemoteLimits(CamelModel):
    """What one provider key may do; the forwarders of all replicas share each key's budget (in Redis)."""

    requests_per_window: int = Field(ge=1, le=1_000_000, description="Requests one key may send per window.")
    window_seconds: int = Field(60, ge=1, le=86400, description="The window of requestsPerWindow and tokensPerWindow.")
    tokens_per_window: int | None = Field(
        None, ge=1, le=1_000_000_000, description="Tokens one key may use per window, where the provider counts them."
    )
    concurrency: int | None = Field(None, ge=1, le=1000, description="Requests one key may have open at once.")


class RemoteBackend(CamelModel):
    """An OpenAI-compatible HTTP API the pool's forwarder pods call, with a pool of keys."""

    api: Literal["chat", "images"] = Field(
        description="chat: chat completions (text steps). images: images generations and edits (image steps)."
    )
    base_url: str = Field(
        max_length=2048,
        pattern=r"^https?://[^ /?#]+[^ ]*$",  # literal classes: Go, Python and Rust agree
        description="The API's base URL, e.g. https://api.openai.com/v1 (paths such as /chat/completions follow).",
    )
    model: str = Field(min_length=1, max_length=256, description="The provider's model name.")
    keys_secret: str = Field(
        max_length=253,
        pattern=_DNS_NAME,
        description=f"A Secret in the pool's namespace, one API key per entry ({MIN_PROVIDER_KEYS}-"
        f"{MAX_PROVIDER_KEYS} entries); an entry's name is the key's id. Mounted as files, never as environment.",
    )
    limits: RemoteLimits
    timeout_seconds: int = Field(120, ge=1, le=3600, description="Of one call to the provider.")
    max_attempts: int = Field(
        5, ge=1, le=20, description="Calls per job, retries of 429, 5xx and timeouts (with backoff) included."
    )
    concurrency_per_replica: int = Field(
        32,
        ge=1,
        le=1000,
        description="Calls one forwarder pod has open at once; replicas follow the queue by this, not by "
        "scaling.targetQueuePerReplica.",
    )


_BUILTINS = ", ".join(f"'builtin:{n}'" for n in BUILTIN_STEPS)


class FunctionBackend(CamelModel):
    """Plain worker processes, one job at a time each, running a Python callable (CPU: see spec.resources)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": f"!self.entryPoint.startsWith('builtin:') || self.entryPoint in [{_BUILTINS}]",
                    "message": f"entryPoint builtin:<name> names one of {', '.join(BUILTIN_STEPS)}",
                }
            ]
        }
    )

    entry_point: str = Field(
        max_length=512,
        pattern=rf"^{_DOTTED}:{_DOTTED}$",
        description=f"module:function from spec.image, or builtin:<name> ({', '.join(BUILTIN_STEPS)}).",
    )

    def cross_field_errors(self) -> list[str]:
        module, _, name = self.entry_point.partition(":")
        if module == "builtin" and name not in BUILTIN_STEPS:
            return [f"spec.function.entryPoint: builtin:{name} is none of {', '.join(BUILTIN_STEPS)}"]
        return []


_ModelName = Annotated[str, Field(min_length=1, max_length=253, pattern=_DNS_NAME)]


class Cost(CamelModel):
    """What the pool's work costs, for usage and per-job cost (docs/history.md): each attempt's GPU-seconds at
    perGpuHour, plus perImage per image made and perJob per job that succeeded."""

    per_gpu_hour: float = Field(0.0, ge=0, le=1_000_000, description="Price of one GPU for an hour.")
    per_image: float = Field(0.0, ge=0, le=1_000_000, description="Price of each image made.")
    per_job: float = Field(0.0, ge=0, le=1_000_000, description="Price of each job that succeeded (text steps too).")
    currency: str = Field("USD", pattern=r"^[A-Z]{3}$", description="ISO 4217 code; one currency per install.")


class Fallbacks(CamelModel):
    """ModelDeployments in the same namespace a job moves to, in order, when this pool cannot serve it."""

    unavailable: list[_ModelName] | None = Field(
        None, max_length=MAX_FALLBACKS, description="When the pool or its provider is down (no ready replica, 503)."
    )
    rate_limited: list[_ModelName] | None = Field(
        None, max_length=MAX_FALLBACKS, description="When the provider keeps answering 429 past maxAttempts."
    )
    failed: list[_ModelName] | None = Field(
        None, max_length=MAX_FALLBACKS, description="When the job failed here for another reason."
    )

    def names(self) -> list[str]:
        return [*(self.unavailable or []), *(self.rate_limited or []), *(self.failed or [])]


class Storage(CamelModel):
    url: str = Field(
        max_length=2048, pattern=URI_PATTERN, description="Where workers store images (ZIMAGE_STORAGE_URL)."
    )


class EnvVar(CamelModel):
    name: str = Field(min_length=1, max_length=256, pattern=r"^[^=]+$")
    value: str | None = None
    value_from: dict[str, Any] | None = Field(None, description="A Kubernetes EnvVarSource.")


_NOT_SELF = " && ".join(
    f"(!has(self.spec.fallbacks.{f}) || !(self.metadata.name in self.spec.fallbacks.{f}))"
    for f in ("unavailable", "rateLimited", "failed")
)
# Rules on the whole object (they need metadata.name); crdgen puts them on the CRD's root schema.
MODELDEPLOYMENT_RULES = [
    {
        "rule": f"!has(self.spec.fallbacks) || ({_NOT_SELF})",
        "message": "spec.fallbacks may not name the ModelDeployment itself",
    }
]
# Rules across spec fields (CEL, on the spec's schema); cross_field_errors says the same for clusters without CEL.
MODELDEPLOYMENT_SPEC_RULES = [
    {
        "rule": "self.backend == 'remote' ? has(self.remote) : !has(self.remote)",
        "message": "spec.remote is required with backend remote and used only with it",
    },
    {
        "rule": "self.backend == 'function' ? has(self.function) : !has(self.function)",
        "message": "spec.function is required with backend function and used only with it",
    },
    {
        "rule": "!has(self.adapters) || self.backend == 'diffusers'",
        "message": "spec.adapters: LoRA adapters are for the diffusers backend",
    },
    {
        "rule": "!has(self.adapters) || self.adapters.all(a, self.adapters.exists_one(b, b.name == a.name))",
        "message": "spec.adapters: each name at most once",
    },
    {
        "rule": "self.backend == 'diffusers' || !has(self.cache) || ((!has(self.cache.preload) || !self.cache.preload)"
        " && !has(self.cache.size) && !has(self.cache.existingClaim))",
        "message": "spec.cache (preload, size, existingClaim) is for the diffusers backend: remote and function "
        "pools keep no model",
    },
]


class ModelDeploymentSpec(CamelModel):
    model_config = ConfigDict(
        json_schema_extra={"x-kubernetes-validations": cast("list[JsonValue]", MODELDEPLOYMENT_SPEC_RULES)}
    )

    backend: Backend = Field(
        "diffusers",
        description="diffusers: GPU workers running the model. remote: forwarder pods calling an external API "
        "(spec.remote). function: CPU workers running a Python callable (spec.function).",
    )
    remote: RemoteBackend | None = None
    function: FunctionBackend | None = None
    model: ModelSource = Field(
        default_factory=ModelSource, description="The diffusers backend's model; remote and function pools ignore it."
    )
    image: str = Field(
        DEFAULT_WORKER_IMAGE,
        min_length=1,
        max_length=1024,
        description="Worker image (diffusers and function backends; remote pools run the operator's image).",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    replicas: int | None = Field(None, ge=0, le=1000, description="Used in external scaling mode (HPA/KEDA).")
    resources: dict[str, Any] | None = Field(
        None,
        description="Container resources; GPU as nvidia.com/gpu (not with backend remote). Remote and function pools "
        "without them get small CPU and memory requests.",
    )
    node_selector: dict[str, str] | None = None
    tolerations: list[dict[str, Any]] | None = None
    affinity: dict[str, Any] | None = None
    priority_class_name: str | None = Field(None, max_length=253, pattern=_DNS_NAME)
    service_account_name: str | None = Field(None, max_length=253, pattern=_DNS_NAME)
    env: list[EnvVar] | None = Field(None, max_length=256, description="Extra worker environment.")
    cache: Cache = Field(default_factory=Cache)
    batching: Batching = Field(default_factory=Batching, description="How diffusers workers batch compatible jobs.")
    acceleration: Acceleration = Field(default_factory=Acceleration)
    scaling: Scaling = Field(default_factory=Scaling)
    fallback: Fallback | None = None
    cost: Cost | None = Field(None, description="Prices for usage and cost accounting (none: the pool costs 0).")
    fallbacks: Fallbacks | None = Field(
        None, description="Per failure class, the ModelDeployments a job moves to (in order) when it fails here."
    )
    storage: Storage | None = None
    adapters: list[AdapterSpec] | None = Field(
        None,
        max_length=64,
        description="LoRA adapters jobs may ask for by name (ImageJob spec.loras), loaded on demand by each worker "
        "and kept resident (up to maxResidentAdapters, least recently used out first).",
    )
    max_resident_adapters: int = Field(4, ge=1, le=64, description="Adapters a worker keeps loaded at once.")
    max_adapters_per_job: int = Field(
        3, ge=0, le=MAX_LORAS_PER_JOB, description="How many of spec.adapters one job may combine."
    )

    def cross_field_errors(self, name: str | None = None) -> list[str]:
        """Rules a structural schema cannot express; the operator reports them as a condition. The CRD's CEL
        rules say the backend ones too, but a cluster without CEL stores what they refuse. ``name``: the
        ModelDeployment's, which a fallback may not be."""
        errors = [*self.scaling.cross_field_errors(), *self.cache.cross_field_errors(), *self._backend_errors()]
        if name and self.fallbacks and name in self.fallbacks.names():
            errors.append(f"spec.fallbacks: {name} is this ModelDeployment")
        names = [e.name for e in self.env or []]
        taken = RESERVED_ENV | {"function": FUNCTION_ENV, "remote": REMOTE_ENV}.get(self.backend, frozenset())
        prefix = REMOTE_ENV_PREFIX if self.backend == "remote" else None
        if reserved := sorted({n for n in names if n in taken or (prefix and n.startswith(prefix))}):
            errors.append(f"spec.env: {', '.join(reserved)} set by the operator")
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            errors.append(f"spec.env: duplicate {', '.join(dupes)}")
        adapters = [a.name for a in self.adapters or []]
        if dupes := sorted({n for n in adapters if adapters.count(n) > 1}):
            errors.append(f"spec.adapters: {', '.join(dupes)} more than once")
        if self.adapters and self.backend != "diffusers":
            errors.append("spec.adapters: LoRA adapters are for the diffusers backend")
        for e in self.env or []:
            if e.value is not None and e.value_from is not None:
                errors.append(f"spec.env[{e.name}]: set value or valueFrom, not both")
        res = self.resources or {}
        gpu_req, gpu_lim = (res.get("requests") or {}).get(GPU_RESOURCE), (res.get("limits") or {}).get(GPU_RESOURCE)
        # Extended resources cannot be overcommitted: Kubernetes rejects requests that differ from limits.
        if gpu_req is not None and gpu_lim is not None and str(gpu_req) != str(gpu_lim):
            errors.append(f"spec.resources: {GPU_RESOURCE} requests ({gpu_req}) and limits ({gpu_lim}) differ")
        if self.backend == "remote" and (gpu_req is not None or gpu_lim is not None):
            errors.append(f"spec.resources: {GPU_RESOURCE} with backend remote (forwarders only wait on HTTP)")
        return errors

    def _backend_errors(self) -> list[str]:
        errors = []
        for backend, part in (("remote", self.remote), ("function", self.function)):
            if (self.backend == backend) != (part is not None):
                errors.append(f"spec.{backend}: required with backend {backend} and used only with it")
        if self.function:
            errors += self.function.cross_field_errors()
        cache = self.cache
        if self.backend != "diffusers" and (cache.preload or cache.size or cache.existing_claim):
            errors.append("spec.cache: preload, size and existingClaim are for the diffusers backend only")
        return errors


class ScalingDecision(CamelModel):
    time: str
    from_: int = Field(alias="from", ge=0)
    to: int = Field(ge=0)
    reason: str = Field(max_length=128)


class AdapterStatus(CamelModel):
    name: str
    workers: list[str] = Field(
        default_factory=list, max_length=100, description="Live workers holding it loaded (the first 100)."
    )


class ModelDeploymentStatus(CamelModel):
    replicas: int | None = None
    ready_replicas: int | None = None
    desired_replicas: int | None = None
    selector: str | None = Field(None, description="Label selector of the worker pods (scale subresource).")
    queue_length: int | None = Field(None, description="Jobs queued and not yet delivered to a worker.")
    in_flight: int | None = Field(None, description="Jobs delivered to a worker and not yet finished.")
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None
    last_scale_time: str | None = None
    adapters: list[AdapterStatus] | None = Field(
        None, description="spec.adapters, each with the live workers that hold it loaded."
    )
    scaling_history: list[ScalingDecision] = Field(
        default_factory=list, max_length=MAX_SCALING_HISTORY, description="The latest replica changes, oldest first."
    )


def variant_defaults(variant: str | None) -> VariantDefaults:
    return VARIANT_DEFAULTS.get(variant or "turbo", VARIANT_DEFAULTS["turbo"])

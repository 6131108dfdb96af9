"""Prometheus metrics of a worker."""

from prometheus_client import Counter, Gauge, Histogram

JOBS = Counter("zimage_worker_jobs_total", "Jobs handled, by outcome", ["outcome"])
INFERENCE_SECONDS = Histogram(
    "zimage_worker_inference_seconds",
    "Pipeline time per pipeline call (one job, or one batch of jobs)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300),
)
QUEUE_WAIT_SECONDS = Histogram(
    "zimage_worker_queue_wait_seconds",
    "Enqueue to start of work",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 900),
)
STORE_SECONDS = Histogram("zimage_worker_store_seconds", "Encode and upload time per job")
MODEL_LOAD_SECONDS = Gauge("zimage_worker_model_load_seconds", "Time it took to load the pipeline")
BUSY = Gauge("zimage_worker_busy", "1 while a job is running")
BATCH_SIZE = Histogram("zimage_worker_batch_size", "Jobs per pipeline call", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64))
WARMUP_SECONDS = Gauge("zimage_worker_warmup_seconds", "Time the warm-up inference took before /readyz turned true")
MODEL_LOADS = Counter("zimage_worker_model_loads_total", "Base pipelines built (model weights loaded)")
ADAPTER_LOADS = Counter("zimage_worker_adapter_loads_total", "LoRA adapters loaded into the pipeline", ["adapter"])
ADAPTER_SWAP_SECONDS = Histogram(
    "zimage_worker_adapter_swap_seconds",
    "Time to switch the pipeline to another adapter set (loads included), per switch",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 15, 60),
)
ADAPTERS_RESIDENT = Gauge("zimage_worker_adapters_resident", "LoRA adapters loaded in the pipeline now")

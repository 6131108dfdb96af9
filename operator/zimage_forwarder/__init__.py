"""The remote backend: forwarder pods that serve a ModelDeployment's queue by calling an external
OpenAI-compatible API through a pool of rate-limited keys (pure asyncio: no CPU-heavy work in this process)."""

#!/usr/bin/env bash
# The worker benchmark on a lent GPU machine (the `device` tool), which has PyTorch and transformers but no
# network, no diffusers, no pydantic and no redis-server.
#
#   bash bench/gpu.sh prepare   # here: wheels for the device's Python 3.12 and redis-server into .gpu/
#   then, with the device tool:  run(command="bash bench/gpu.sh run", carry=[".gpu"], timeout_s=600)
#
# `run` installs what .gpu/ holds, then runs bench.worker on Z-Image-Turbo's full-size architecture with
# random weights (1024x1024, 8 steps, bf16) and profiles batch 4; the output goes to $OUT/bench-worker.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
prepare)
  rm -rf .gpu && mkdir -p .gpu/wheels .gpu/debs
  exclude="$(git rev-parse --git-path info/exclude)"; mkdir -p "$(dirname "$exclude")"
  grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >>"$exclude"
  # Only what the device image lacks; --no-deps keeps its torch, transformers, numpy and pillow.
  python3 -m pip download -q --dest .gpu/wheels --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --no-deps "diffusers==$(.venv/bin/python -c 'import diffusers; print(diffusers.__version__)')" \
    pydantic pydantic-core pydantic-settings python-dotenv typing-inspection annotated-types redis importlib-metadata
  # redis-server and every library it links, from this Debian: run through a wrapper that alone sees them.
  (cd .gpu/debs && apt-get download -q redis-server redis-tools libjemalloc2 liblzf1 libatomic1 libsystemd0 \
    libcap2 libgcrypt20 libgpg-error0 liblz4-1 libzstd1 liblzma5 libssl3 2>/dev/null)
  du -sh .gpu
  ;;
run)
  python3 -m pip install -q --no-deps --no-index .gpu/wheels/*.whl
  root=/tmp/redis-root && mkdir -p "$root/bin" && for f in .gpu/debs/*.deb; do dpkg -x "$f" "$root"; done
  libs="$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu"
  printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "$libs" "$root/usr/bin/redis-server" >"$root/bin/redis-server"
  chmod +x "$root/bin/redis-server" && export PATH="$root/bin:$PATH"
  redis-server --version
  export PYTHONPATH="$PWD/operator:$PWD/worker_image:$PWD/api:$PWD"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -m bench.worker --model full-random --size 1024 --steps 8 --requests 32 --profile 4 \
    2>&1 | tee "${OUT:-/tmp}/bench-worker.txt"
  ;;
*)
  echo "usage: bash bench/gpu.sh prepare|run" >&2
  exit 2
  ;;
esac

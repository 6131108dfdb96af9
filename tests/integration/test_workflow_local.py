"""`zimage workflow run` on the embedded stack (no cluster): the example pipeline with a provider stand-in, its
outputs in the final status; a workflow whose step cannot be served fails with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from bench.provider import ProviderStandIn
from conftest import REPO, product_photo_and_mask
from zimage_api.cli import main

EXAMPLE = REPO / "docs" / "examples" / "workflow-product.yaml"


def test_the_example_runs_locally_and_every_output_is_in_its_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo, mask = product_photo_and_mask(tmp_path)
    with ProviderStandIn({"sk-demo-1": "4/1s", "sk-demo-2": "4/1s"}) as llm:
        text = EXAMPLE.read_text().replace("http://127.0.0.1:8090/v1", llm.url)
        (tmp_path / "wf.yaml").write_text(text)
        argv = ["workflow", "run", "-f", str(tmp_path / "wf.yaml"), "--watch", "-o", "json"]
        argv += ["--input", f"product=@{photo}", "--input", f"mask=@{mask}", "--state-dir", str(tmp_path / "s")]
        assert main(argv) == 0
    out = capsys.readouterr()
    wf = json.loads(out.out)
    assert "sneaker: Succeeded 4/4" in out.err
    status = wf["status"]
    assert status["phase"] == "Succeeded"
    steps = {s["name"]: s for s in status["steps"]}
    assert steps["enhance"]["instances"][0]["text"].startswith("Stand-in reply to: Write a vivid")
    [compose] = steps["compose"]["instances"]
    with Image.open(compose["images"][0].removeprefix("file://")) as img:
        assert img.size == (512, 512) and img.getpixel((256, 256))[:3] == (200, 30, 30)
    sizes = []
    for inst in steps["resize"]["instances"]:
        with Image.open(inst["images"][0].removeprefix("file://")) as img:
            sizes.append(img.size)
    assert sizes == [(512, 512), (768, 256)]
    assert len(llm.records(path="/v1/chat/completions")) == 1


def test_a_failing_step_fails_the_workflow_with_its_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with ProviderStandIn(["sk-demo-1", "sk-demo-2"], down=True) as llm:
        text = EXAMPLE.read_text().replace("http://127.0.0.1:8090/v1", llm.url)
        (tmp_path / "wf.yaml").write_text(text)
        argv = ["workflow", "run", "-f", str(tmp_path / "wf.yaml"), "--input", "product=s3://x/y.png"]
        argv += ["--input", "mask=s3://x/m.png", "--state-dir", str(tmp_path / "s"), "--timeout", "120"]
        assert main(argv) == 1
    out = capsys.readouterr().out
    assert "sneaker: Failed" in out, out
    # the step's one retry (retries: 1) was a new job, which failed too; nothing after it ran
    assert "step enhance job sneaker-enhance-r1: every key of the pool is benched" in out, out
    assert [line.split()[:2] for line in out.splitlines()[3:7]] == [
        ["background", "Skipped"],
        ["compose", "Skipped"],
        ["resize[0]", "Skipped"],
        ["resize[1]", "Skipped"],
    ]

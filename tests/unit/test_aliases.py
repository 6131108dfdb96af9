"""Model aliases: which ModelDeployment a name clients send stands for (pure), and the chart's api.modelAliases
reaching the API's settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_chart import helm, render  # noqa: F401  (helm: the fixture)
from zimage_api.aliases import OPENAI_MODELS, aliases, may_be_alias
from zimage_api.settings import ApiSettings


def md(name: str, variant: str | None = None) -> dict[str, Any]:
    spec = {"model": {"variant": variant}} if variant else {}
    return {"metadata": {"name": name}, "spec": spec}


TURBO, BASE, EDIT = md("z-turbo", "turbo"), md("z-base", "base"), md("z-edit", "edit")
OPENAI = dict.fromkeys(OPENAI_MODELS, "z-turbo")
HOUSE = {"house": "z-base"}


@pytest.mark.parametrize(
    ("configured", "models", "default", "expected"),
    [
        # OpenAI's names mean the default model; each variant's name a ModelDeployment of that variant.
        ({}, [TURBO, BASE, EDIT], "z-turbo", {**OPENAI, "turbo": "z-turbo", "base": "z-base", "edit": "z-edit"}),
        # No default model: no OpenAI names (a request with one is a 404), the variants still resolve.
        ({}, [TURBO, BASE], None, {"turbo": "z-turbo", "base": "z-base"}),
        # A variant with several pools: the default model when it is one of them, else the first by name.
        ({}, [md("b", "turbo"), md("a", "turbo")], "b", {**dict.fromkeys(OPENAI_MODELS, "b"), "turbo": "b"}),
        ({}, [md("b", "turbo"), md("a", "turbo")], None, {"turbo": "a"}),
        # A spec without a variant is turbo, as the CRD defaults it.
        ({}, [md("plain")], None, {"turbo": "plain"}),
        # A ModelDeployment's own name wins over a built-in alias ...
        ({}, [md("turbo", "base"), TURBO], "z-turbo", {**OPENAI, "base": "turbo"}),
        # ... a configured alias over both; "" drops a built-in one.
        (
            {"turbo": "z-base", "dall-e-2": "", "house": "z-base"},
            [TURBO, BASE],
            "z-turbo",
            {
                **{k: v for k, v in OPENAI.items() if k != "dall-e-2"},
                "turbo": "z-base",
                "base": "z-base",
                "house": "z-base",
            },
        ),
        ({}, [], None, {}),
    ],
)
def test_aliases(
    configured: dict[str, str], models: list[dict[str, Any]], default: str | None, expected: dict[str, str]
) -> None:
    assert aliases(configured, models, default) == expected


def test_only_alias_names_need_the_model_list() -> None:
    assert may_be_alias("dall-e-3", {}) and may_be_alias("edit", {}) and may_be_alias("house", {"house": "x"})
    assert not may_be_alias("z-image-turbo", {}) and not may_be_alias("gpt-image-2", {})


def test_aliases_setting_is_json_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZIMAGE_API_MODEL_ALIASES", json.dumps({"dall-e-3": "z-base", "dall-e-2": ""}))
    assert ApiSettings().model_aliases == {"dall-e-3": "z-base", "dall-e-2": ""}
    monkeypatch.setenv("ZIMAGE_API_MODEL_ALIASES", json.dumps({"dall-e-3": "Not A Name"}))
    with pytest.raises(ValueError, match="not a ModelDeployment name"):
        ApiSettings()


def test_chart_model_aliases_reach_the_api(
    helm: list[str],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    aliases_value = {"dall-e-3": "z-image-base", "dall-e-2": ""}
    values = tmp_path / "aliases.yaml"
    values.write_text(yaml.safe_dump({"api": {"modelAliases": aliases_value}}))
    for docs, want in ((render(helm), {}), (render(helm, values), aliases_value)):
        [api] = [
            d
            for d in docs
            if d["kind"] == "Deployment" and d["metadata"]["labels"]["app.kubernetes.io/component"] == "api"
        ]
        env = api["spec"]["template"]["spec"]["containers"][0]["env"]
        with monkeypatch.context() as m:
            for e in env:
                if "value" in e:
                    m.setenv(e["name"], e["value"])
            assert ApiSettings().model_aliases == want

"""The official ``openai`` SDK against the running local API, as clients use it: every way they name a model,
both response formats, edits with and without a mask, streaming, the fields current SDKs send, the errors."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.api.conftest import Api, decode, png

pytestmark = pytest.mark.timeout(120)
MODEL = "z-image-turbo"  # the local API's one ModelDeployment (variant turbo), its default model


def openai_client(api: Api, key: str = "dev") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key=api.keys[key], max_retries=0)


def image_of(item: Any) -> bytes:
    if item.url is not None:
        assert item.b64_json is None
        return httpx.get(item.url).raise_for_status().content  # signed: no API key needed
    assert item.b64_json
    return base64.b64decode(item.b64_json)


# -- generations ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", [None, "dall-e-3", "gpt-image-1", "turbo", MODEL])
@pytest.mark.parametrize("response_format", ["url", "b64_json"])
def test_generate_with_each_model_name(api: Api, model: str | None, response_format: str) -> None:
    res = openai_client(api).images.generate(
        prompt="a red fox",
        model=model if model else openai.omit,
        size="128x96",
        response_format=response_format,  # type: ignore[arg-type]
    )
    (item,) = res.data or []
    assert (item.url is not None) == (response_format == "url")
    img = decode(image_of(item))
    assert img.size == (128, 96) and img.format == "PNG"
    assert res.size == "128x96" and res.output_format == "png"


def test_several_images_and_the_default_response_format(api: Api) -> None:
    client = openai_client(api)
    # DALL-E's default answer is a URL, GPT image models' is base64 (as OpenAI's are).
    res = client.images.generate(prompt="a fox", model="dall-e-2", size="64x64", n=2)
    assert len(res.data or []) == 2 and all(i.url and i.b64_json is None for i in res.data or [])
    res = client.images.generate(prompt="a fox", model="gpt-image-1-mini", size="64x64")
    assert (res.data or [])[0].b64_json and (res.data or [])[0].url is None


@pytest.mark.parametrize(("output_format", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
def test_output_format_is_the_image_format(api: Api, output_format: str, pil_format: str) -> None:
    res = openai_client(api).images.generate(
        prompt="a fox",
        model="gpt-image-1.5",
        size="64x64",
        output_format=output_format,  # type: ignore[arg-type]
        output_compression=80,
    )
    assert res.output_format == output_format
    assert decode(image_of((res.data or [])[0])).format == pil_format


def test_fields_current_sdks_send_are_accepted(api: Api) -> None:
    res = openai_client(api).images.generate(
        prompt="a fox",
        model="gpt-image-1",
        size="auto",  # 1024x1024, as OpenAI's default
        quality="high",
        background="opaque",
        moderation="low",
        user="user-42",
        safety_identifier="hash-of-user",
        partial_images=0,
        stream=False,
    )
    assert decode(image_of((res.data or [])[0])).size == (1024, 1024)
    res = openai_client(api).images.generate(
        prompt="a fox", model="dall-e-3", size="64x64", quality="hd", style="natural"
    )
    assert decode(image_of((res.data or [])[0])).size == (64, 64)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("quality", "ultra"),
        ("style", "cartoon"),
        ("background", "transparent"),  # Z-Image cannot: refused rather than quietly not done
        ("output_format", "gif"),
        ("output_compression", 101),
        ("moderation", "none"),
        ("partial_images", 4),
        ("response_format", "binary"),
        ("size", "big"),
    ],
)
def test_invalid_values_are_400_naming_the_field(api: Api, field: str, value: object) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        openai_client(api).images.generate(prompt="x", size="64x64", extra_body={field: value})
    assert bad.value.status_code == 400
    assert bad.value.param == field and bad.value.type == "invalid_request_error", bad.value.body  # type: ignore[attr-defined]


# -- edits ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("model", [None, "gpt-image-1"])
def test_edit(api: Api, with_mask: bool, model: str | None) -> None:
    # OpenAI's masks are transparent where the image is to change.
    mask = png(96, 64, "RGBA", (0, 0, 0, 0)) if with_mask else None
    res = openai_client(api).images.edit(
        image=("fox.png", png(96, 64), "image/png"),
        mask=("mask.png", mask, "image/png") if mask else openai.omit,
        model=model if model else openai.omit,
        prompt="the fox in snow",
        response_format="b64_json",
        input_fidelity="high",
        quality="low",
    )
    assert decode(image_of((res.data or [])[0])).size == (96, 64)  # size auto: the input's
    res = openai_client(api).images.edit(
        image=("fox.png", png(64, 64), "image/png"), prompt="in snow", size="64x64", output_format="webp"
    )
    img = decode(image_of((res.data or [])[0]))
    assert img.size == (64, 64) and img.format == "WEBP"


# -- streaming -----------------------------------------------------------------------------------------------
def completed(events: Iterator[Any]) -> list[Any]:
    got = list(events)
    assert got, "the stream carried no event"
    return got


@pytest.mark.parametrize("partial_images", [None, 0, 2])
def test_streamed_generation_ends_with_the_completed_image(api: Api, partial_images: int | None) -> None:
    stream = openai_client(api).images.generate(
        prompt="a fox",
        model="gpt-image-1",
        size="128x64",
        stream=True,
        partial_images=openai.omit if partial_images is None else partial_images,
    )
    events = completed(iter(stream))
    # No previews exist (workers report steps, not pictures): the completed image is the one event.
    assert [e.type for e in events] == ["image_generation.completed"]
    (done,) = events
    img = decode(base64.b64decode(done.b64_json))
    assert img.size == (128, 64) and img.format == "PNG"
    assert done.size == "128x64" and done.output_format == "png" and done.usage.total_tokens == 0


def test_streamed_generation_of_several_images(api: Api) -> None:
    stream = openai_client(api).images.generate(prompt="a fox", size="64x64", n=2, stream=True, output_format="jpeg")
    events = completed(iter(stream))
    assert [e.type for e in events] == ["image_generation.completed"] * 2
    assert {decode(base64.b64decode(e.b64_json)).format for e in events} == {"JPEG"}


@pytest.mark.parametrize("with_mask", [False, True])
def test_streamed_edit(api: Api, with_mask: bool) -> None:
    mask = png(64, 64, "RGBA", (0, 0, 0, 0)) if with_mask else None
    stream = openai_client(api).images.edit(
        image=("fox.png", png(64, 64), "image/png"),
        mask=("mask.png", mask, "image/png") if mask else openai.omit,
        prompt="the fox in snow",
        model="gpt-image-1",
        stream=True,
    )
    events = completed(iter(stream))
    assert [e.type for e in events] == ["image_edit.completed"]
    assert decode(base64.b64decode(events[0].b64_json)).size == (64, 64)


def test_a_refused_stream_is_an_error_before_any_event(api: Api) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        openai_client(api).images.generate(prompt="x", model="no-such-model", stream=True)
    assert missing.value.code == "model_not_found"


# -- models and errors ---------------------------------------------------------------------------------------
def test_models_lists_the_aliases(api: Api) -> None:
    models = {m.id: m for m in openai_client(api).models.list()}
    assert models[MODEL].object == "model" and models[MODEL].owned_by == "zimage"
    assert getattr(models[MODEL], "alias_of", None) is None
    for alias in ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5", "turbo"):
        m = models[alias]
        assert (m.object, getattr(m, "alias_of", None), getattr(m, "variant", None)) == ("model", MODEL, "turbo")
    assert "base" not in models and "edit" not in models  # no ModelDeployment of those variants here


def test_unknown_model_is_not_found(api: Api) -> None:
    client = openai_client(api)
    for name in ("no-such-model", "base"):  # base: no ModelDeployment of that variant
        with pytest.raises(openai.NotFoundError) as missing:
            client.images.generate(prompt="x", model=name)
        assert (missing.value.code, missing.value.param) == ("model_not_found", "model")  # type: ignore[attr-defined]
        assert missing.value.type == "not_found_error"  # type: ignore[attr-defined]
    with pytest.raises(openai.NotFoundError):
        client.images.edit(image=("fox.png", png(64, 64), "image/png"), prompt="x", model="no-such-model")


def test_configured_aliases(api: Api) -> None:
    settings = api.local.settings
    saved = settings.model_aliases
    settings.model_aliases = {"house-style": MODEL, "dall-e-2": ""}  # a new name; a built-in one dropped
    try:
        client = openai_client(api)
        res = client.images.generate(prompt="a fox", model="house-style", size="64x64")
        assert decode(image_of((res.data or [])[0])).size == (64, 64)
        ids = {m.id for m in client.models.list()}
        assert "house-style" in ids and "dall-e-2" not in ids and "dall-e-3" in ids
        with pytest.raises(openai.NotFoundError):
            client.images.generate(prompt="x", model="dall-e-2")
    finally:
        settings.model_aliases = saved


def test_errors_are_typed(api: Api) -> None:
    client = openai_client(api)
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="x", size="4096x4096")
    assert bad.value.param == "width"  # type: ignore[attr-defined]
    assert "less than or equal to 2048" in bad.value.message
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{api.url}/v1", api_key="zk_nope_not-a-real-key-at-all", max_retries=0).images.generate(
            prompt="x"
        )

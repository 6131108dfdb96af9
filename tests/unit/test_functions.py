"""The function engine's built-in steps on real images, its entry points, and its inputs (zimage_worker.functions)."""

from __future__ import annotations

import io
import subprocess
import sys
from typing import Any

import pytest
from PIL import Image

from zimage_queue import GenerationParams, JobMessage
from zimage_worker.engine import Cancelled
from zimage_worker.functions import BUILTINS, FunctionEngine, InputError, resolve
from zimage_worker.results import encode

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def run(entry: str, images: dict[str, Image.Image], args: dict[str, Any] | None = None, **params: Any) -> Image.Image:
    """One job through FunctionEngine, inputs served from memory by URI as the worker's load_image would."""
    store = {f"file:///store/{name}.png": png(img) for name, img in images.items()}
    fields: dict[str, Any] = {"prompt": "zimage", "task": "image-to-image", "width": 64, "height": 64, **params}
    if "image" in images:
        fields["input_image"] = "file:///store/image.png"
    if "mask" in images:
        fields["mask_image"] = "file:///store/mask.png"
        fields["task"] = "inpaint"
    extra = {n: f"file:///store/{n}.png" for n in images if n not in ("image", "mask")}
    p = GenerationParams(**fields, args={**extra, **(args or {})} or None)
    steps: list[tuple[int, int]] = []
    [out] = FunctionEngine(entry).generate(
        p, on_step=lambda s, t: steps.append((s, t)), should_stop=lambda: False, load_image=store.__getitem__
    )
    assert steps and steps[-1][0] == steps[-1][1]
    encode(out, p.output_format)  # what the worker stores must encode
    return out


def test_compose_pastes_the_overlay_through_the_mask_at_x_y() -> None:
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (0, 0, 8, 16))  # left half of the overlay only
    out = run(
        "builtin:compose",
        {"image": Image.new("RGB", (64, 48), BLUE), "overlay": Image.new("RGB", (16, 16), RED), "mask": mask},
        {"x": 10, "y": 20},
    )
    assert out.size == (64, 48) and out.mode == "RGB"
    assert out.getpixel((12, 25)) == RED  # inside, through white mask
    assert out.getpixel((22, 25)) == BLUE  # inside the overlay's box, mask black
    assert out.getpixel((5, 5)) == BLUE


def test_compose_centres_scales_and_uses_the_overlays_alpha() -> None:
    overlay = Image.new("RGBA", (8, 8), (*RED, 255))
    overlay.putpixel((0, 0), (*RED, 0))
    out = run(
        "builtin:compose",
        {"image": Image.new("RGB", (64, 64), BLUE), "overlay": overlay},
        {"scale": 2},
    )
    # 16x16 centred: 24..40
    assert out.getpixel((32, 32)) == RED and out.getpixel((23, 32)) == BLUE and out.getpixel((40, 32)) == BLUE
    assert out.getpixel((24, 24)) == BLUE  # the transparent corner, scaled


@pytest.mark.parametrize(
    ("images", "args", "match"),
    [
        ({"image": Image.new("RGB", (8, 8))}, {}, "args.overlay"),
        ({"overlay": Image.new("RGB", (8, 8))}, {}, "inputImage"),
        ({"image": Image.new("RGB", (8, 8)), "overlay": Image.new("RGB", (8, 8))}, {"x": "left"}, "args.x"),
        ({"image": Image.new("RGB", (8, 8)), "overlay": Image.new("RGB", (8, 8))}, {"scale": 0}, "args.scale"),
    ],
)
def test_compose_refuses_bad_arguments(images: dict[str, Image.Image], args: dict[str, Any], match: str) -> None:
    with pytest.raises(InputError, match=match):
        run("builtin:compose", images, args)


def test_resize_fit_fill_stretch() -> None:
    src = Image.new("RGB", (200, 100), RED)
    src.paste(GREEN, (0, 0, 50, 100))  # left quarter green
    assert run("builtin:resize", {"image": src}, width=64, height=64).size == (64, 32)
    fill = run("builtin:resize", {"image": src}, {"mode": "fill"}, width=64, height=64)
    assert fill.size == (64, 64) and fill.getpixel((10, 32)) == RED  # the green quarter was cropped off
    stretch = run("builtin:resize", {"image": src}, {"mode": "stretch"}, width=64, height=128)
    assert stretch.size == (64, 128) and stretch.getpixel((2, 64)) == GREEN
    with pytest.raises(InputError, match=r"args\.mode: one of fit, fill, stretch"):
        run("builtin:resize", {"image": src}, {"mode": "zoom"})


def test_crop_centred_and_at_x_y() -> None:
    src = Image.new("RGB", (128, 128), BLUE)
    src.paste(RED, (0, 0, 64, 64))
    centred = run("builtin:crop", {"image": src}, width=64, height=64)
    assert centred.size == (64, 64) and centred.getpixel((0, 0)) == RED and centred.getpixel((63, 63)) == BLUE
    at = run("builtin:crop", {"image": src}, {"x": 0, "y": 0}, width=64, height=64)
    assert at.getpixel((63, 63)) == RED
    with pytest.raises(InputError, match="not inside the 128x128 input image"):
        run("builtin:crop", {"image": src}, {"x": 100}, width=64, height=64)


def test_pad_centres_on_a_colour() -> None:
    out = run("builtin:pad", {"image": Image.new("RGB", (32, 16), RED)}, {"color": "#00ff00"}, width=64, height=64)
    assert out.size == (64, 64) and out.getpixel((32, 32)) == RED and out.getpixel((0, 0)) == GREEN
    assert out.getpixel((32, 23)) == GREEN and out.getpixel((32, 24)) == RED
    with pytest.raises(InputError, match="larger"):
        run("builtin:pad", {"image": Image.new("RGB", (128, 16))}, width=64, height=64)
    with pytest.raises(InputError, match=r"args\.color"):
        run("builtin:pad", {"image": Image.new("RGB", (16, 16))}, {"color": "not-a-colour"})


def test_convert_flattens_alpha_for_jpeg() -> None:
    src = Image.new("RGBA", (32, 32), (*RED, 255))
    src.putpixel((0, 0), (0, 0, 0, 0))
    out = run("builtin:convert", {"image": src}, output_format="jpeg")
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((16, 16)) == RED
    assert run("builtin:convert", {"image": src}, output_format="webp").mode == "RGBA"
    assert run("builtin:convert", {"image": src}, {"mode": "L"}, output_format="png").mode == "L"
    with pytest.raises(InputError, match="no alpha"):
        run("builtin:convert", {"image": src}, {"mode": "RGBA"}, output_format="jpeg")


@pytest.mark.parametrize("corner", ["bottom-right", "bottom-left", "top-left", "top-right"])
def test_watermark_draws_the_prompt_in_its_corner(corner: str) -> None:
    src = Image.new("RGB", (256, 256), BLUE)
    out = run("builtin:watermark", {"image": src}, {"corner": corner, "opacity": 1, "size": 16}, prompt="ZIMAGE")
    assert out.size == src.size and out.mode == "RGB"
    changed = [(x, y) for x in range(256) for y in range(256) if out.getpixel((x, y)) != BLUE]
    assert changed and (255, 255, 255) in {out.getpixel(p) for p in changed}
    xs, ys = [x for x, _ in changed], [y for _, y in changed]
    assert (min(xs) < 128) == corner.endswith("left") and (max(xs) >= 128) == corner.endswith("right")
    assert (min(ys) < 128) == corner.startswith("top") and (max(ys) >= 128) == corner.startswith("bottom")
    with pytest.raises(InputError, match=r"args\.opacity"):
        run("builtin:watermark", {"image": src}, {"opacity": 2})


def test_every_builtin_step_of_the_crd_exists() -> None:
    from zimage_operator.types import BUILTIN_STEPS

    assert set(BUILTINS) == set(BUILTIN_STEPS)


def test_entry_points_resolve_or_fail_at_startup() -> None:
    assert resolve("builtin:resize") is BUILTINS["resize"]
    assert resolve("tests.unit.test_functions:user_step") is user_step
    for bad, match in [
        ("builtin:blur", "none of"),
        ("resize", "expected module:function"),
        ("tests.unit.test_functions:nope", "has no nope"),
        ("tests.unit.test_functions:RED", "not callable"),
    ]:
        with pytest.raises(ValueError, match=match):
            resolve(bad)
    with pytest.raises(ModuleNotFoundError):
        resolve("no_such_module_here:step")


def user_step(params: GenerationParams, inputs: dict[str, Image.Image], args: dict[str, Any]) -> list[Image.Image]:
    return [inputs["image"].rotate(90, expand=True)] * int(args.get("copies", 1))


def test_a_user_step_gets_params_inputs_and_args() -> None:
    store = {"file:///s/a.png": png(Image.new("RGB", (32, 16), RED))}
    p = GenerationParams(prompt="x", task="image-to-image", input_image="file:///s/a.png", args={"copies": 2})
    out = FunctionEngine("tests.unit.test_functions:user_step").generate(
        p, on_step=lambda s, t: None, should_stop=lambda: False, load_image=store.__getitem__
    )
    assert [i.size for i in out] == [(16, 32), (16, 32)]


def test_engine_refuses_unreadable_inputs_bad_returns_and_stops_when_cancelled() -> None:
    p = GenerationParams(prompt="x", task="image-to-image", input_image="file:///s/a.png")
    kw: dict[str, Any] = {"on_step": lambda s, t: None, "should_stop": lambda: False}
    ok = png(Image.new("RGB", (8, 8)))
    with pytest.raises(InputError, match="not an image"):
        FunctionEngine("builtin:resize").generate(p, load_image=lambda uri: b"not a png", **kw)
    with pytest.raises(TypeError, match="non-empty list of PIL images"):
        FunctionEngine("tests.unit.test_functions:bad_step").generate(p, load_image=lambda uri: ok, **kw)
    with pytest.raises(Cancelled):
        FunctionEngine("builtin:resize").generate(
            p, on_step=lambda s, t: None, should_stop=lambda: True, load_image=lambda uri: b""
        )


def bad_step(params: GenerationParams, inputs: dict[str, Image.Image], args: dict[str, Any]) -> Any:
    return "an image"


def test_args_are_written_only_when_set() -> None:
    """A release before ``args`` still reads every message that has none."""
    base: dict[str, Any] = {"uid": "u", "namespace": "ns", "name": "n", "queue": "ns/m"}
    plain = JobMessage(**base, params=GenerationParams(prompt="x", seed=1))
    assert '"args"' not in plain.model_dump_json(by_alias=True)
    p = GenerationParams(prompt="x", seed=1, args={"overlay": "file:///a.png", "x": 3, "scale": 1.5, "on": True})
    with_args = JobMessage(**base, params=p)
    back = JobMessage.model_validate_json(with_args.model_dump_json(by_alias=True))
    assert back.params.args == {"overlay": "file:///a.png", "x": 3, "scale": 1.5, "on": True}
    assert isinstance(back.params.args["on"], bool) and isinstance(back.params.args["x"], int)


def test_function_path_imports_without_torch() -> None:
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'diffusers', 'transformers'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import zimage_worker.__main__, zimage_worker.functions\n"
        "from zimage_worker.functions import FunctionEngine\n"
        "FunctionEngine('builtin:compose')\n"
        "assert not any(m.split('.')[0] in ('torch', 'diffusers') for m in sys.modules)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr

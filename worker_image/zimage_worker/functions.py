"""The function engine: a ModelDeployment with ``backend: function`` runs a Python callable per job, on a CPU.

``ZIMAGE_FUNCTION`` names the callable: ``builtin:<name>`` for one of the steps below, or ``module:function``
for one of the user's, imported from the worker image (``PYTHONPATH``). The contract of a step::

    def step(params: GenerationParams, inputs: dict[str, PIL.Image.Image], args: dict) -> list[PIL.Image.Image]

- ``params`` is the job's ``GenerationParams`` (prompt, width, height, output_format, ...).
- ``inputs`` holds the job's images, decoded: ``"image"`` (``params.input_image``), ``"mask"``
  (``params.mask_image``), and for every argument whose value is an image URI, that image under the argument's
  name (``args.overlay`` -> ``inputs["overlay"]``). They are read through the worker's ``load_image``: the
  tenant's part of the store, or an allowed http(s) host.
- ``args`` is ``params.args`` (``{}`` when unset): strings, numbers, booleans, lists of them.
- It returns one or more images; they are stored in ``params.output_format`` (an image with alpha is put on
  white for jpeg).
- A step raises ``InputError`` (``from zimage_worker.functions import InputError``) for arguments or inputs it
  cannot use: the job fails at once, without retries, with that message. Any other exception is retried.

Built-in steps (Pillow only), each returning one image; sizes come from ``params.width``/``params.height``:

- ``compose``: paste ``args.overlay`` onto ``inputs["image"]``, through ``inputs["mask"]`` (resized to the
  overlay; white = overlay) or else the overlay's own alpha, at ``args.x``/``args.y`` (its top-left corner) or
  centred, scaled by ``args.scale`` (default 1). The result has the background's size.
- ``resize``: to ``width`` x ``height``; ``args.mode`` ``fit`` (default: inside the box, aspect kept),
  ``fill`` (cover the box, aspect kept, centre cropped to it exactly) or ``stretch`` (exactly, aspect lost).
- ``crop``: a ``width`` x ``height`` box, centred or at ``args.x``/``args.y``; it must lie inside the image.
- ``pad``: to ``width`` x ``height`` (no smaller than the image), the image centred on ``args.color``
  (a CSS colour, default ``black``).
- ``convert``: re-encoded as ``output_format``; ``args.mode`` (``RGB``, ``RGBA``, ``L``) picks the pixel mode,
  transparency is flattened onto ``args.background`` (default ``white``) when the mode or format has none.
- ``watermark``: ``params.prompt`` as text in ``args.corner`` (``bottom-right`` default, ``bottom-left``,
  ``top-left``, ``top-right``), at ``args.opacity`` (0 to 1, default 0.5), ``args.size`` pixels high (default a
  twentieth of the image height).

Neither torch nor diffusers is imported here: a function worker's image may not have them.
"""

from __future__ import annotations

import importlib
import io
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageColor, ImageDraw, ImageFont, UnidentifiedImageError

from zimage_queue.message import URI_PATTERN
from zimage_worker.engine import Cancelled
from zimage_worker.loop import InputError

if TYPE_CHECKING:
    from zimage_queue import GenerationParams

__all__ = ["BUILTINS", "FunctionEngine", "InputError", "resolve"]

Step = Callable[["GenerationParams", dict[str, Image.Image], dict[str, Any]], list[Image.Image]]
FUNCTION = "function"
_URI = re.compile(URI_PATTERN)
# An input larger than this is refused before decoding (Pillow's own bomb guard is a warning up to twice this).
MAX_INPUT_PIXELS = 64 * 1024 * 1024


# -- arguments ---------------------------------------------------------------------------------------------
def _arg_int(args: dict[str, Any], name: str) -> int | None:
    v = args.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or v != int(v):
        raise InputError(f"args.{name}: an integer, got {v!r}")
    return int(v)


def _arg_float(args: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    v = args.get(name, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or not low <= v <= high:
        raise InputError(f"args.{name}: a number from {low:g} to {high:g}, got {v!r}")
    return float(v)


def _arg_choice(args: dict[str, Any], name: str, choices: tuple[str, ...]) -> str:
    v = args.get(name, choices[0])
    if v not in choices:
        raise InputError(f"args.{name}: one of {', '.join(choices)}, got {v!r}")
    return str(v)


def _arg_colour(args: dict[str, Any], name: str, default: str) -> tuple[int, ...]:
    v = args.get(name, default)
    try:
        return ImageColor.getrgb(str(v))
    except ValueError:
        raise InputError(f"args.{name}: a colour (a name, #rrggbb, rgb(...)), got {v!r}") from None


def _need(inputs: dict[str, Image.Image], name: str, what: str) -> Image.Image:
    if name not in inputs:
        raise InputError(f"{what} is required")
    return inputs[name]


def _size(params: GenerationParams) -> tuple[int, int]:
    return params.width, params.height


def _flatten(image: Image.Image, background: tuple[int, ...] = (255, 255, 255)) -> Image.Image:
    """RGB, with any transparency put on ``background``."""
    if image.mode in ("RGB", "L"):
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    out = Image.new("RGB", rgba.size, background[:3])
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


# -- built-in steps ----------------------------------------------------------------------------------------
def compose(params: GenerationParams, inputs: dict[str, Image.Image], args: dict[str, Any]) -> list[Image.Image]:
    background = _need(inputs, "image", "inputImage (the background)")
    overlay = _need(inputs, "overlay", "args.overlay (the overlay image's URI)")
    scale = _arg_float(args, "scale", 1.0, 0.01, 16.0)
    if scale != 1.0:
        size = (max(1, round(overlay.width * scale)), max(1, round(overlay.height * scale)))
        overlay = overlay.resize(size, Image.Resampling.LANCZOS)
    if "mask" in inputs:
        mask = inputs["mask"].convert("L").resize(overlay.size, Image.Resampling.BILINEAR)
    elif overlay.mode in ("RGBA", "LA", "PA") or "transparency" in overlay.info:
        mask = overlay.convert("RGBA").getchannel("A")
    else:
        mask = Image.new("L", overlay.size, 255)
    x, y = _arg_int(args, "x"), _arg_int(args, "y")
    at = (
        (background.width - overlay.width) // 2 if x is None else x,
        (background.height - overlay.height) // 2 if y is None else y,
    )
    keep_alpha = background.mode in ("RGBA", "LA", "PA")
    out = background.convert("RGBA" if keep_alpha else "RGB")
    out.paste(overlay.convert(out.mode), at, mask)
    return [out]


def resize(params: GenerationParams, inputs: dict[str, Image.Image], args: dict[str, Any]) -> list[Image.Image]:
    image = _need(inputs, "image", "inputImage")
    mode = _arg_choice(args, "mode", ("fit", "fill", "stretch"))
    w, h = _size(params)
    if mode == "stretch":
        return [image.resize((w, h), Image.Resampling.LANCZOS)]
    ratio = (min if mode == "fit" else max)(w / image.width, h / image.height)
    scaled = (max(1, round(image.width * ratio)), max(1, round(image.height * ratio)))
    out = image.resize(scaled, Image.Resampling.LANCZOS)
    if mode == "fill":
        left, top = (out.width - w) // 2, (out.height - h) // 2
        out = out.crop((left, top, left + w, top + h))
    return [out]


def crop(params: GenerationParams, inputs: dict[str, Image.Image], args: dict[str, Any]) -> list[Image.Image]:
    image = _need(inputs, "image", "inputImage")
    w, h = _size(params)
    x, y = _arg_int(args, "x"), _arg_int(args, "y")
    left = (image.width - w) // 2 if x is None else x
    top = (image.height - h) // 2 if y is None else y
    if left < 0 or top < 0 or left + w > image.width or top + h > image.height:
        raise InputError(f"crop box {w}x{h} at {left},{top} is not inside the {image.width}x{image.height} input image")
    return [image.crop((left, top, left + w, top + h))]


def pad(params: GenerationParams, inputs: dict[str, Image.Image], args: dict[str, Any]) -> list[Image.Image]:
    image = _need(inputs, "image", "inputImage")
    w, h = _size(params)
    if image.width > w or image.height > h:
        raise InputError(f"pad to {w}x{h}: the input image is larger ({image.width}x{image.height}); crop or resize")
    colour = _arg_colour(args, "color", "black")
    mode = "RGBA" if image.mode in ("RGBA", "LA", "PA") else "RGB"
    out = Image.new(mode, (w, h), colour if mode == "RGBA" else colour[:3])
    src = image.convert(mode)
    out.paste(src, ((w - image.width) // 2, (h - image.height) // 2), src if mode == "RGBA" else None)
    return [out]


def convert(params: GenerationParams, inputs: dict[str, Image.Image], args: dict[str, Any]) -> list[Image.Image]:
    image = _need(inputs, "image", "inputImage")
    default = "RGB" if params.output_format == "jpeg" or image.mode not in ("RGBA", "LA", "PA") else "RGBA"
    mode = str(args.get("mode", default))
    if mode not in ("RGB", "RGBA", "L"):
        raise InputError(f"args.mode: one of RGB, RGBA, L, got {mode!r}")
    if mode == "RGBA" and params.output_format == "jpeg":
        raise InputError("args.mode: jpeg has no alpha channel; use RGB or L")
    background = _arg_colour(args, "background", "white")
    if mode == "RGBA":
        return [image.convert("RGBA")]
    flat = _flatten(image, background)
    return [flat if mode == "RGB" else flat.convert("L")]


CORNERS = ("bottom-right", "bottom-left", "top-left", "top-right")


def watermark(params: GenerationParams, inputs: dict[str, Image.Image], args: dict[str, Any]) -> list[Image.Image]:
    image = _need(inputs, "image", "inputImage")
    corner = _arg_choice(args, "corner", CORNERS)
    opacity = _arg_float(args, "opacity", 0.5, 0.0, 1.0)
    size = _arg_int(args, "size") or max(12, image.height // 20)
    if not 4 <= size <= 1024:
        raise InputError(f"args.size: 4 to 1024 pixels, got {size}")
    font = ImageFont.load_default(size=size)
    base = image.convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    left, top, right, bottom = draw.textbbox((0, 0), params.prompt, font=font)
    margin = max(2, size // 2)
    x = margin - left if corner.endswith("left") else base.width - margin - right
    y = margin - top if corner.startswith("top") else base.height - margin - bottom
    alpha = round(255 * opacity)
    # A dark outline keeps white text legible on light images.
    draw.text((x, y), params.prompt, font=font, fill=(255, 255, 255, alpha), stroke_width=max(1, size // 16),
              stroke_fill=(0, 0, 0, alpha))  # fmt: skip
    out = Image.alpha_composite(base, layer)
    return [out if image.mode in ("RGBA", "LA", "PA") else out.convert("RGB")]


BUILTINS: dict[str, Step] = {
    "compose": compose,
    "resize": resize,
    "crop": crop,
    "pad": pad,
    "convert": convert,
    "watermark": watermark,
}


# -- the engine --------------------------------------------------------------------------------------------
def resolve(entry_point: str) -> Step:
    """``builtin:<name>`` or ``module:function`` -> the callable. Raises ``ValueError`` (at startup, not per job)."""
    module, sep, name = entry_point.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"function entry point {entry_point!r}: expected module:function or builtin:<name>")
    if module == "builtin":
        if name not in BUILTINS:
            raise ValueError(f"builtin:{name} is none of {', '.join(BUILTINS)}")
        return BUILTINS[name]
    target: Any = importlib.import_module(module)
    for part in name.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ValueError(f"function entry point {entry_point!r}: {module} has no {name}")
    if not callable(target):
        raise ValueError(f"function entry point {entry_point!r} is not callable")
    return target


def _decode(uri: str, data: bytes) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as opened:
            if opened.width * opened.height > MAX_INPUT_PIXELS:
                raise InputError(f"{uri}: {opened.width}x{opened.height} is more than {MAX_INPUT_PIXELS} pixels")
            opened.load()
            return opened.copy()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise InputError(f"{uri} is not an image Pillow can read: {e}") from e


class FunctionEngine:
    """The ``Engine`` of a function pool: one call of ``entry_point`` per job (no batches)."""

    name = FUNCTION
    variant = "turbo"  # no model; the operator resolves the steps of a function pool's jobs with these defaults

    def __init__(self, entry_point: str) -> None:
        self.entry_point = entry_point
        self.step = resolve(entry_point)

    def generate(
        self,
        params: GenerationParams,
        *,
        on_step: Callable[[int, int], None],
        should_stop: Callable[[], bool],
        load_image: Callable[[str], bytes],
    ) -> list[Image.Image]:
        if should_stop():
            raise Cancelled()
        args = dict(params.args or {})
        uris = {"image": params.input_image, "mask": params.mask_image}
        uris |= {k: v for k, v in args.items() if isinstance(v, str) and _URI.match(v)}
        inputs = {name: _decode(uri, load_image(uri)) for name, uri in uris.items() if uri}
        images = self.step(params, inputs, args)
        if not isinstance(images, list) or not images or not all(isinstance(i, Image.Image) for i in images):
            raise TypeError(f"{self.entry_point} must return a non-empty list of PIL images, got {type(images)}")
        # The worker's progress counts the steps the operator resolved; a function is one step of all of them.
        total = max(1, (params.steps or 1) * params.num_images)
        on_step(total, total)
        if params.output_format == "jpeg":
            images = [i if i.mode in ("RGB", "L") else _flatten(i) for i in images]
        return images

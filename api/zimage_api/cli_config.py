"""What every ``zimage`` subcommand shares: its settings (environment), and the flags several of them take.

A command module has a ``register(sub, shared)`` that adds its parsers to ``sub`` (``zimage_api.cli.COMMANDS``
lists them) and sets ``func`` on each: ``func(args) -> int``, the exit status, with ``args.shared`` this
``Shared``. Raise ``zimage_api.cli_errors.UserError`` for what the user got wrong (one line, exit 2).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from zimage_api.cli_errors import UserError

OUTPUT_FORMATS = ("table", "json", "yaml", "name")


class CliSettings(BaseSettings):
    """``ZIMAGE_API_URL``, ``ZIMAGE_API_KEY``, ``ZIMAGE_MODEL_SOURCE`` and ``MODELS_DIR``: flags override them."""

    model_config = SettingsConfigDict(env_prefix="ZIMAGE_")

    api_url: str = Field("", description="The API `--api` defaults to.")
    api_key: str = Field("", description="The key `--api-key` defaults to.")
    model_source: str = Field("tiny-random", description="The local model `--model` defaults to.")
    models_dir: str | None = Field(None, validation_alias="MODELS_DIR")


def _parent(*adders: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    for add in adders:
        add(p)
    return p


def _debug(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: given after the subcommand it sets the flag, left out it keeps what came before it.
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")


def _api(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--api", default=argparse.SUPPRESS, metavar="URL", help="the zimage API, e.g. http://localhost:8080 "
        "(default: $ZIMAGE_API_URL)"
    )  # fmt: skip
    p.add_argument("--api-key", default=argparse.SUPPRESS, metavar="KEY", help="default: $ZIMAGE_API_KEY")


def _output(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-o", "--output", choices=OUTPUT_FORMATS, default="table", help="table (default), json, yaml, or name (job/ID)"
    )


@dataclass
class Shared:
    """Settings and parent parsers (``parents=[shared.debug, ...]``) for the command modules."""

    settings: CliSettings
    debug: argparse.ArgumentParser = field(default_factory=lambda: _parent(_debug))
    api: argparse.ArgumentParser = field(default_factory=lambda: _parent(_api))
    output: argparse.ArgumentParser = field(default_factory=lambda: _parent(_output))

    def api_url(self, args: argparse.Namespace) -> str:
        url = getattr(args, "api", None) or self.settings.api_url
        if not url:
            raise UserError("--api URL (or $ZIMAGE_API_URL): which API to ask")
        return str(url)

    def api_key(self, args: argparse.Namespace) -> str:
        return str(getattr(args, "api_key", None) or self.settings.api_key)


Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]", Shared], None]

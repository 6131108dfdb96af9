"""``zimage``: the user CLI. ``zimage generate "a red fox" -o fox.png`` runs the whole stack locally.

Each subcommand lives in its own module with a ``register(sub, shared)`` (see ``zimage_api.cli_config``);
``COMMANDS`` is the list ``main`` builds the parser from, the one place a new subcommand is added. A parser's
``func(args)`` runs the command and returns the exit status; ``args.shared`` holds the settings.

Errors: a user error (``zimage_api.cli_errors.UserError``, and argparse's own) prints one line,
``zimage: error: <message>``, and exits 2; a failed job or an API 5xx exits 1 the same way; anything else is a
bug: one line and exit 1 as well. ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
import traceback
from types import FrameType
from typing import NoReturn, cast

from zimage_api import cli_generate, cli_jobs, cli_keys, cli_usage, cli_workflow, dev
from zimage_api.cli_config import CliSettings, Register, Shared
from zimage_api.cli_errors import FAILED, CliError, UserError
from zimage_queue import logs
from zimage_queue.message import VARIANT_DEFAULTS, AdapterSpec, variant_help


def exit_on_sigterm() -> None:
    """SIGTERM (``kill``, a shell's ``kill %1``) unwinds the stack as Ctrl-C does, so every ``with`` block's
    cleanup runs: the private Redis stops and the temporary directories go. The exit status is 128 + 15, what a
    shell reports for a process the signal ended. Further SIGTERMs are ignored so they cannot cut that cleanup
    short (it is bounded; SIGKILL still ends the process, and the Redis dies with it)."""

    def stop(signum: int, frame: FrameType | None) -> None:
        signal.signal(signum, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def register_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser], shared: Shared) -> None:
    s = sub.add_parser(
        "serve",
        parents=[shared.debug],
        help="run the REST API locally: private Redis, a worker, an in-memory job store",
    )
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--model", default=None, help="default: $ZIMAGE_MODEL_SOURCE, else tiny-random")
    s.add_argument("--models-dir", default=None, help="default: $MODELS_DIR")
    s.add_argument("--variant", default="turbo", choices=list(VARIANT_DEFAULTS), help=variant_help())
    s.add_argument("--images-dir", default=None, help="where images are kept (default: a temp dir)")
    s.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=SOURCE",
        help="a LoRA adapter jobs may name in loras (a path, under --models-dir too, or a hub id); repeatable",
    )
    s.set_defaults(func=serve)


def adapter_arg(text: str) -> AdapterSpec:
    name, sep, source = text.partition("=")
    if not sep or not name or not source:
        raise SystemExit(f"--adapter {text!r}: NAME=SOURCE")
    try:
        return AdapterSpec(name=name, source=source)
    except ValueError as e:
        raise SystemExit(f"--adapter {text!r}: {e}") from None


def serve(args: argparse.Namespace) -> int:
    shared: Shared = args.shared
    import uvicorn

    from zimage_api.local import DEV_KEY, local_api

    model = args.model or shared.settings.model_source
    logs.configure(text=True)
    adapters = [adapter_arg(a) for a in args.adapter]
    engine = cli_generate.load_local_engine(
        model, args.variant, args.models_dir or shared.settings.models_dir, adapters=adapters
    )
    with local_api(
        model, variant=args.variant, images_dir=args.images_dir, engine=engine, dev_admin=True, adapters=adapters
    ) as la:
        url = f"http://{args.host}:{args.port}"
        print(
            f"zimage API on {url} (console: {url}/ui/, docs: {url}/docs), model {model} as z-image-turbo\n"
            f"API key: {DEV_KEY}\n"
            f"  curl -H 'Authorization: Bearer {DEV_KEY}' -H 'Content-Type: application/json' \\\n"
            f'       {url}/v1/jobs -d \'{{"prompt": "a red fox"}}\'\n'
            f"  OpenAI(base_url='{url}/v1', api_key='{DEV_KEY}').images.generate(prompt='a red fox')",
            file=sys.stderr,
        )
        uvicorn.run(la.app, host=args.host, port=args.port, log_level="warning", log_config=None)
    return 0


# The subcommands, in the order `zimage -h` lists them. A new one: a module with `register`, added here.
COMMANDS: list[Register] = [
    cli_generate.register,
    register_serve,
    cli_jobs.register,
    cli_usage.register,
    cli_keys.register,
    dev.register,
    cli_workflow.register,
]


class Parser(argparse.ArgumentParser):
    """argparse's usage errors as one line, like every other user error."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see '{self.prog} -h')")


def build_parser(shared: Shared) -> Parser:
    p = Parser(prog="zimage", description="Z-Image jobs from the command line.")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    p.set_defaults(shared=shared)
    # Parser's subparsers are Parsers too (their errors are one line); the command modules need only argparse's.
    sub = cast("argparse._SubParsersAction[argparse.ArgumentParser]", p.add_subparsers(dest="command", required=True))
    for register in COMMANDS:
        register(sub, shared)
    sub.metavar = "{" + ",".join(sub.choices) + "}"
    return p


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [e.__class__.__name__])[0]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv  # known before parsing, so a failed parse can show its traceback too
    previous = signal.getsignal(signal.SIGTERM)
    try:
        shared = Shared(CliSettings())
        args = build_parser(shared).parse_args(argv)
        debug = bool(getattr(args, "debug", False))
        exit_on_sigterm()
        code: int = args.func(args)
        return code
    except CliError as e:
        if debug:
            traceback.print_exc()
        print(f"zimage: error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C: the cleanup ran on the way here; no traceback for it
        sys.stderr.write("\n")
        return 128 + signal.SIGINT
    except Exception as e:
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (--debug shows the traceback)"
        print(f"zimage: error: internal error: {e.__class__.__name__}: {_one_line(e)}{hint}", file=sys.stderr)
        return FAILED
    finally:
        signal.signal(signal.SIGTERM, previous)  # main(argv) called from a test leaves the process as it was


if __name__ == "__main__":
    sys.exit(main())

"""``zimage keys create``: a new API key (printed once, on stdout) and the command that adds its hashed entry to
the keys Secret (on stderr).

The command is a server-side apply of a Secret holding only this key's entry, under a field manager of its own
(``zimage-key-<id>``). Server-side apply merges a map's keys owned by different managers, so it adds the entry
and keeps every other key, whether the Secret exists already or not (it creates it then), and whoever made the
other entries (``kubectl create secret``, an earlier ``zimage keys create``). Running it again for the same id
replaces that entry only. ``tests/api/test_cli_keys.py`` runs it twice on the Kubernetes test bed.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys

from zimage_api.cli_config import Shared
from zimage_api.cli_errors import UserError

FIELD_MANAGER_PREFIX = "zimage-key-"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], shared: Shared) -> None:
    k = sub.add_parser("keys", parents=[shared.debug], help="API keys")
    ks = k.add_subparsers(dest="keys_command", required=True, metavar="{create}")
    kc = ks.add_parser(
        "create", parents=[shared.debug], help="make a key; prints it once, and how to add its hash to the Secret"
    )
    kc.add_argument("--tenant", required=True)
    kc.add_argument("--id", default=None, help="key id (1-32 characters a-z, 0-9; default random)")
    kc.add_argument("--rate-per-second", type=float, default=None)
    kc.add_argument("--burst", type=int, default=None)
    kc.add_argument("--max-concurrent-jobs", type=int, default=None)
    kc.add_argument("--bulk", action="store_true", help="the key's jobs are bulk jobs (no ImageJob) by default")
    kc.add_argument(
        "--admin", action="store_true", help="the key sees every tenant's usage and job history (zimage usage)"
    )
    kc.add_argument("--secret", default="zimage-api-keys", help="the keys Secret (the chart's api.keysSecret)")
    kc.add_argument("-n", "--namespace", default=None, help="its namespace (default: kubectl's current one)")
    kc.set_defaults(func=create_key)


def _yaml_quoted(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def secret_command(secret: str, namespace: str | None, kid: str, entry: str) -> str:
    """A POSIX shell command that adds ``kid: entry`` to the Secret and keeps its other keys."""
    ns = f" -n {shlex.quote(namespace)}" if namespace else ""
    return (
        f"kubectl apply{ns} --server-side --field-manager={FIELD_MANAGER_PREFIX}{kid} -f - <<'EOF'\n"
        "apiVersion: v1\n"
        "kind: Secret\n"
        f"metadata: {{name: {_yaml_quoted(secret)}}}\n"
        "stringData:\n"
        f"  {_yaml_quoted(kid)}: {_yaml_quoted(entry)}\n"
        "EOF"
    )


def create_key(args: argparse.Namespace) -> int:
    from zimage_api.apikeys import entry_json, key_id, new_key

    try:
        key = new_key(args.id)
        kid = key_id(key)
        if kid is None:
            raise ValueError("--id: 1-32 characters a-z, 0-9")
        entry = entry_json(
            key,
            args.tenant,
            ratePerSecond=args.rate_per_second,
            burst=args.burst,
            maxConcurrentJobs=args.max_concurrent_jobs,
            bulk=args.bulk,
            admin=args.admin,
        )
    except ValueError as e:
        raise UserError(str(e).replace("tenant must", "--tenant must")) from e
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", args.secret):
        raise UserError(f"--secret must be a Secret name (a-z, 0-9, -, .), got {args.secret!r}")
    print(key)
    print(
        f"# give the key to tenant {args.tenant}; the Secret keeps only its hash. This adds the entry and keeps the\n"
        f"# Secret's other keys (it creates the Secret if there is none):\n"
        f"{secret_command(args.secret, args.namespace, kid, entry)}",
        file=sys.stderr,
    )
    return 0

"""`forwardpass keys` (create, list, revoke) and `forwardpass usage`: tenants from the command line.

    forwardpass keys create --tier free --owner alice@example.com   # prints the secret once
    forwardpass keys list
    forwardpass usage --key free-1 --from 2026-12-01                  # read from the server's usage.sqlite

Both work on the files a server reads ($FORWARDPASS_HOME/keys.yaml and $FORWARDPASS_HOME/state/usage.sqlite
unless told otherwise), with or without a server running: a running server sees new and revoked keys
within a second, and writes usage every flush interval.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from forwardpass.errors import ForwardpassError

KeysOption = Annotated[Path | None, typer.Option("--keys-file", envvar="FORWARDPASS_KEYS_FILE",
                                                 help="keys.yaml [default: $FORWARDPASS_HOME/keys.yaml]")]  # fmt: skip
TiersOption = Annotated[Path | None, typer.Option("--tiers-file", envvar="FORWARDPASS_TIERS_FILE",
                                                  help="tiers.yaml: limits, prices")]  # fmt: skip


def add_commands(app: typer.Typer, sub_app: Any, out: Console, err: Console) -> None:
    """Register `keys ...` and `usage` on the main command line (``sub_app`` makes a sub-command group)."""
    keys_app = sub_app(no_args_is_help=True, help="API keys with tiers (keys.yaml keeps only each secret's SHA-256).")
    app.add_typer(keys_app, name="keys")

    @keys_app.command("create")
    def create(
        tier: Annotated[str, typer.Option(help="The key's tier (free, pro, unlimited, or one of tiers.yaml)")] = "free",
        key_id: Annotated[str | None, typer.Option("--id", help="The key's id [default: TIER-N]")] = None,
        owner: Annotated[str | None, typer.Option(help="Who holds it (for usage reports)")] = None,
        expires: Annotated[str | None, typer.Option(help="Refused from this day on (YYYY-MM-DD, UTC)")] = None,
        admin: Annotated[bool, typer.Option("--admin", help="May also control the repository")] = False,
        keys_file: KeysOption = None,
        tiers_file: TiersOption = None,
    ) -> None:
        """Create a key: the secret is printed once, keys.yaml keeps its SHA-256."""
        from forwardpass.monitoring.keys import Tiers, create_key

        day = _day(expires, "--expires") if expires is not None else None
        path = _keys_path(keys_file)
        secret, record = create_key(path, tier, key_id=key_id, owner=owner, expires=day, admin=admin,
                                    tiers=Tiers.load(tiers_file))  # fmt: skip
        typer.echo(secret)
        err.print(f"key '{record.id}' (tier {record.tier}) added to {path}; the secret above is shown only now: send it "
                  "as 'Authorization: Bearer <secret>'", markup=False, highlight=False)  # fmt: skip

    @keys_app.command("list")
    def list_keys(keys_file: KeysOption = None) -> None:
        """The keys of keys.yaml (ids, tiers, owners, expiry; never a secret)."""
        from forwardpass.monitoring.keys import read_keys

        table = Table("id", "tier", "owner", "expires", "admin")
        for r in read_keys(_keys_path(keys_file)):
            table.add_row(r.id, r.tier, r.owner or "", r.expires.isoformat() if r.expires else "", "yes" if r.admin else "")
        out.print(table)

    @keys_app.command("revoke")
    def revoke(key_id: Annotated[str, typer.Argument(metavar="ID", help="The key's id")],
               keys_file: KeysOption = None) -> None:  # fmt: skip
        """Remove a key: a running server refuses it within a second."""
        from forwardpass.monitoring.keys import revoke_key

        record = revoke_key(_keys_path(keys_file), key_id)
        out.print(f"key '{record.id}' revoked", markup=False, highlight=False)

    @app.command()
    def usage(
        key: Annotated[str | None, typer.Option(help="One key's usage [default: every key's]")] = None,
        start: Annotated[str | None, typer.Option("--from", help="First day (YYYY-MM-DD, UTC)")] = None,
        end: Annotated[str | None, typer.Option("--to", help="Last day (YYYY-MM-DD, UTC)")] = None,
        state_dir: Annotated[Path | None, typer.Option(envvar="FORWARDPASS_STATE_DIR", help="The server's state "
                                                       "folder [default: $FORWARDPASS_HOME/state]")] = None,  # fmt: skip
        tiers_file: TiersOption = None,
        as_json: Annotated[bool, typer.Option("--json", help="JSON rows instead of a table")] = False,
    ) -> None:
        """Usage per key, model and day (requests, rows, tokens, compute seconds, errors) and its cost."""
        import json

        from forwardpass.monitoring import default_state_dir
        from forwardpass.monitoring.keys import Tiers
        from forwardpass.monitoring.usage import read_usage, totals

        folder = state_dir if state_dir is not None else default_state_dir()
        first = _day(start, "--from").isoformat() if start else None
        last = _day(end, "--to").isoformat() if end else None
        rows = read_usage(folder / "usage.sqlite", key, first, last)
        cost = Tiers.load(tiers_file).add_costs(rows)
        if as_json:
            typer.echo(json.dumps({"data": rows, "totals": {**totals(rows), "cost": cost}}, indent=2))
            return
        names = ("day", "key", "model", "requests", "rows", "prompt_tokens", "cached_tokens", "completion_tokens",
                 "compute_seconds", "errors", "cost")  # fmt: skip
        short = {"prompt_tokens": "prompt", "cached_tokens": "cached", "completion_tokens": "completion",
                 "compute_seconds": "seconds"}  # fmt: skip
        table = Table(*(short.get(n, n) for n in names))
        for row in rows:
            table.add_row(*("" if row[n] is None else f"{row[n]:g}" if isinstance(row[n], float) else str(row[n])
                            for n in names))  # fmt: skip
        summed = totals(rows)
        table.add_row("total", "", "", *(f"{summed[n]:g}" for n in names[3:10]), "" if cost is None else f"{cost:g}")
        out.print(table)


def _keys_path(given: Path | None) -> Path:
    from forwardpass.monitoring import default_keys_file

    return given if given is not None else default_keys_file()


def _day(text: str, option: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ForwardpassError(f"{option} {text!r}: expected a day as YYYY-MM-DD") from None

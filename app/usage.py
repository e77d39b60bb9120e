"""``python -m app.usage``: who used what, from the state store the gateway writes.

    python -m app.usage                                   this month, per day, key and model
    python -m app.usage --since 7d --by key               the last week, per key
    python -m app.usage --key alice --model claude-sonnet-4-5 --format csv > alice.csv

It reads the store of the configuration ``GATEWAY_CONFIG`` names (the SQLite file in the
state directory, or Redis), so run it as the service's user, with the service's environment
(deploy/README.md). The gateway's admin endpoint ``GET /admin/usage`` gives the same report as
JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from app.config import ConfigError, load_settings
from app.errors import GatewayError
from app.policy.usage import (
    GROUPS,
    BadPeriod,
    comma_separated,
    period,
    report,
    summed,
    table,
)
from app.state.open import open_store


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    by = [name.strip() for name in args.by.split(",") if name.strip()]
    try:
        since, until = period(args.since, args.until, time.time())
        settings = load_settings()
        store = open_store(settings.state)
        try:
            rows = store.usage(since, until, args.key, args.model)
        finally:
            store.close()
        entries = summed(rows, by)
    except (BadPeriod, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except GatewayError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    if args.format == "json":
        print(json.dumps(report(rows, since, until, by), indent=2))
    elif args.format == "csv":
        sys.stdout.write(comma_separated(entries, by))
    else:
        print(f"usage {since} to {until} (UTC days)")
        sys.stdout.write(table(entries, by))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app.usage", description=__doc__.split("\n")[0])
    parser.add_argument("--since", help="first day: 2026-12-01, today or 7d (default: the 1st)")
    parser.add_argument("--until", help="last day, included (default: today)")
    parser.add_argument("--key", help="one client key's name (- for requests without a key)")
    parser.add_argument("--model", help="one model, as clients name it")
    parser.add_argument(
        "--by",
        default=",".join(GROUPS),
        help=f"what to sum by, comma separated, of {', '.join(GROUPS)} (default: all three)",
    )
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    return parser


if __name__ == "__main__":
    sys.exit(main())

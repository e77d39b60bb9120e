"""``python -m app.batches``: the operator's view of message batches, every key's.

    python -m app.batches list                     the newest batches, with their progress
    python -m app.batches list --key alice --limit 100
    python -m app.batches show msgbatch_01…        one batch, as the API shows it, and its progress
    python -m app.batches cancel msgbatch_01…      stop it: running items finish, the rest canceled
    python -m app.batches purge msgbatch_01…       delete ended batches and their files
    python -m app.batches purge --ended-before 7d  every batch that ended more than 7 days ago
    python -m app.batches sweep [--at TIME]        end expired batches, archive old ones (the
                                                   workers do it every few seconds; --at moves the
                                                   clock, to see what a later sweep will do)

It works on the store and the batch directory of the configuration ``GATEWAY_CONFIG`` names,
so run it as the service's user, with the service's environment (deploy/README.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from app.batches.files import BatchFiles, batch_directory
from app.batches.service import Batches, Viewer
from app.batches.shapes import message_batch, rfc3339
from app.config import ConfigError, load_settings, parse_instant
from app.errors import GatewayError
from app.keys import DURATION_UNITS
from app.state.batch_queue import ENDED, BatchRecord
from app.state.guard import GuardedStore
from app.state.open import open_store

ADMIN = Viewer(None)
PAGE = 1000


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
        store = open_store(settings.state)
        files = BatchFiles(batch_directory(settings))
        try:
            return int(args.run(args, Batches(settings.batches, store, files), store, files))
        finally:
            store.close()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except GatewayError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1


def _list(args: argparse.Namespace, batches: Batches, store: GuardedStore, _: BatchFiles) -> int:
    found = store.run(lambda s: s.batch_list(args.key, args.limit, None, None))
    print(f"{'id':<36} {'key':<16} {'status':<12} {'done':>15} {'running':>7}  created")
    for record in found.records:
        progress = f"{record.done}/{record.total}"
        print(
            f"{record.id:<36} {record.owner:<16.16} {record.status:<12} {progress:>15} "
            f"{record.running:>7}  {rfc3339(record.created_at)}"
        )
    if found.has_more:
        print(f"(more: raise --limit above {args.limit})")
    return 0


def _show(args: argparse.Namespace, batches: Batches, store: GuardedStore, _: BatchFiles) -> int:
    record = batches.get(args.id, ADMIN)
    shown = message_batch(record, "")
    shown["key"] = record.owner
    shown["progress"] = _progress(record)
    print(json.dumps(shown, indent=2))
    return 0


def _cancel(args: argparse.Namespace, batches: Batches, store: GuardedStore, _: BatchFiles) -> int:
    record = batches.cancel(args.id, ADMIN)
    print(f"{record.id}: {record.status} ({record.running} items still running)")
    return 0


def _purge(args: argparse.Namespace, batches: Batches, store: GuardedStore, _: BatchFiles) -> int:
    ids = list(args.ids)
    if args.ended_before:
        ids += _ended_before(store, _moment(args.ended_before, ago=True))
    if not ids:
        print("error: name batches, or give --ended-before", file=sys.stderr)
        return 2
    failed = 0
    for batch_id in ids:
        try:
            batches.delete(batch_id, ADMIN)
            print(f"{batch_id}: deleted")
        except GatewayError as exc:
            print(f"{batch_id}: {exc.message}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def _sweep(
    args: argparse.Namespace, batches: Batches, store: GuardedStore, files: BatchFiles
) -> int:
    now = _moment(args.at, ago=False) if args.at else time.time()
    archived = store.run(lambda s: s.batch_sweep(now))
    for batch_id in archived:
        files.remove(batch_id)
        print(f"{batch_id}: archived, its requests and results removed")
    print(f"swept at {rfc3339(now)}: {len(archived)} archived")
    return 0


def _progress(record: BatchRecord) -> dict[str, int]:
    """The live counts the API keeps back until the batch ends."""
    return {
        "total": record.total,
        "succeeded": record.succeeded,
        "errored": record.errored,
        "running": record.running,
        "waiting": record.total - record.done - record.running,
    }


def _ended_before(store: GuardedStore, moment: float) -> list[str]:
    found: list[str] = []
    after: str | None = None
    while True:
        page = store.run(lambda s, a=after: s.batch_list(None, PAGE, None, a))  # type: ignore[misc]
        for record in page.records:
            if record.status == ENDED and record.ended_at is not None and record.ended_at < moment:
                found.append(record.id)
        if not page.has_more or not page.records:
            return found
        after = page.records[-1].id


def _moment(text: str, *, ago: bool) -> float:
    """7d / 12h (ago, or from now), or a date or time (UTC unless it says)."""
    unit = DURATION_UNITS.get(text[-1:])
    if unit and text[:-1].isdigit():
        return time.time() + (-1 if ago else 1) * int(text[:-1]) * unit
    moment = parse_instant("time", text)
    assert moment is not None
    return moment


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m app.batches", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(required=True)
    listing = commands.add_parser("list", help="the newest batches, every key's, with progress")
    listing.add_argument("--key", help="one client key's batches (- without keys)")
    listing.add_argument("--limit", type=int, default=20)
    listing.set_defaults(run=_list)
    show = commands.add_parser("show", help="one batch, and its live progress")
    show.add_argument("id")
    show.set_defaults(run=_show)
    cancel = commands.add_parser("cancel", help="cancel a batch")
    cancel.add_argument("id")
    cancel.set_defaults(run=_cancel)
    purge = commands.add_parser("purge", help="delete ended batches and their files")
    purge.add_argument("ids", nargs="*")
    purge.add_argument("--ended-before", help="every batch that ended before: 7d ago, or a date")
    purge.set_defaults(run=_purge)
    sweep = commands.add_parser("sweep", help="end expired batches and archive old ones now")
    sweep.add_argument("--at", help="sweep as if it were this time: 30d from now, or a date")
    sweep.set_defaults(run=_sweep)
    return parser


if __name__ == "__main__":
    sys.exit(main())

"""Usage records as people read them: a period asked for in words, rows summed by what the
reader cares about, and the same report as JSON (the admin endpoint), a table or CSV (the
``python -m app.usage`` command).

Pure: the standard library and app.state.store's row type only; the clock is passed in.
"""

from __future__ import annotations

import csv
import io
import re
import time
from collections.abc import Iterable, Sequence

from app.state.store import USAGE_COUNTS, UsageRow

COUNTS = USAGE_COUNTS  # batch_*: the part batch items made (app/batches)
GROUPS = ("day", "key", "model")  # what a row may be summed by
DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
RELATIVE = re.compile(r"(\d{1,5})d")
MAX_DAYS = 3660  # ten years: an admin query never walks more days than this

# One line of a report: the values of the fields it is summed by (day, key, model) as text,
# and its COUNTS as whole numbers.
Entry = dict[str, str | int]


class BadPeriod(ValueError):
    """A period that names no days; the message says what was expected."""


def period(since: str | None, until: str | None, now: float) -> tuple[str, str]:
    """``since`` and ``until`` as ISO days (UTC), both included. Each is a date
    (2026-12-01), ``today``, or ``Nd`` (N days ago); ``since`` defaults to the first day of
    this month and ``until`` to today."""
    today = _day(now)
    first = _day_of(since, now, "since") if since else today[:8] + "01"
    last = _day_of(until, now, "until") if until else today
    if first > last:
        raise BadPeriod(f"since ({first}) is after until ({last})")
    return first, last


def summed(rows: Iterable[UsageRow], by: Sequence[str]) -> list[Entry]:
    """The rows added up per distinct value of the ``by`` fields, in their order."""
    for name in by:
        if name not in GROUPS:
            raise BadPeriod(f"cannot group by {name!r}: one of {', '.join(GROUPS)}")
    totals: dict[tuple[str, ...], dict[str, int]] = {}
    for row in rows:
        group = tuple(str(getattr(row, name)) for name in by)
        counts = totals.setdefault(group, dict.fromkeys(COUNTS, 0))
        for name in COUNTS:
            counts[name] += getattr(row, name)
    return [_entry(by, group, totals[group]) for group in sorted(totals)]


def _entry(by: Sequence[str], group: tuple[str, ...], counts: dict[str, int]) -> Entry:
    entry: Entry = {name: value for name, value in zip(by, group, strict=True)}
    entry.update(counts)
    return entry


def total(rows: Iterable[UsageRow]) -> dict[str, int]:
    found = dict.fromkeys(COUNTS, 0)
    for row in rows:
        for name in COUNTS:
            found[name] += getattr(row, name)
    return found


def report(
    rows: list[UsageRow], since: str, until: str, by: Sequence[str] = GROUPS
) -> dict[str, object]:
    """The JSON of a report: the period, the rows summed by ``by``, and the totals."""
    return {
        "since": since,
        "until": until,
        "group_by": list(by),
        "data": summed(rows, by),
        "total": total(rows),
    }


def table(entries: list[Entry], by: Sequence[str]) -> str:
    """Aligned columns, counts to the right with thousands separators, and a total line."""
    columns = [*by, *COUNTS]
    sums: Entry = {name: sum(int(e[name]) for e in entries) for name in COUNTS}
    if by:
        sums[by[0]] = "total"
    lines = [[name.upper() for name in columns]]
    lines += [[_cell(entry.get(name, "")) for name in columns] for entry in (*entries, sums)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    text = []
    for line in lines:
        cells = [
            cell.rjust(width) if index >= len(by) else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        text.append("  ".join(cells).rstrip())
    return "\n".join(text) + "\n"


def comma_separated(entries: list[Entry], by: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*by, *COUNTS])
    for entry in entries:
        writer.writerow([entry[name] for name in (*by, *COUNTS)])
    return out.getvalue()


def _day_of(text: str, now: float, name: str) -> str:
    text = text.strip()
    if text == "today":
        return _day(now)
    relative = RELATIVE.fullmatch(text)
    if relative:
        days = min(int(relative.group(1)), MAX_DAYS)
        return _day(now - days * 86400)
    if DAY.fullmatch(text):
        try:
            time.strptime(text, "%Y-%m-%d")
        except ValueError:
            raise BadPeriod(f"{name}: {text!r} is not a calendar day") from None
        return text
    raise BadPeriod(f"{name}: give a day like 2026-12-01, today, or 7d (7 days ago)")


def _day(moment: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(moment))


def _cell(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)

"""Acquisition dates: from file names (a pattern the user can set), GeoTIFF tags and sidecars.

Dates are ``datetime.date``; shards store them as days since 1970-01-01 (int32) and batches as
day of year (1..366).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import numpy as np

EPOCH = dt.date(1970, 1, 1)

# The default: the first YYYYMMDD (optionally followed by THHMMSS) or YYYY-MM-DD in the text,
# not glued to other digits (so a tile number or an orbit number is not read as a date).
DEFAULT_PATTERN = re.compile(
    r"(?<!\d)(?P<year>(?:19|20)\d\d)(?P<sep>-?)(?P<month>\d\d)(?P=sep)(?P<day>\d\d)(?=T\d{6}|\D|$)"
)

# GeoTIFF / GDAL metadata keys that carry an acquisition date, in order of trust.
DATE_TAGS = (
    "ACQUISITION_DATE",
    "acquisition_date",
    "DATE_ACQUIRED",
    "SENSING_TIME",
    "DATATAKE_SENSING_START",
    "TIFFTAG_DATETIME",
)


class DateError(ValueError):
    """A date that cannot be parsed; the message names the text and the pattern."""


def parse_date(text: str, pattern: str | re.Pattern | None = None) -> dt.date:
    """The acquisition date in ``text`` (a file name, a tag value).

    ``pattern`` is either a regular expression with named groups ``year``, ``month``, ``day``
    (or one group ``date`` holding YYYYMMDD / YYYY-MM-DD), or a ``strptime`` format such as
    ``"%Y%m%d"`` that is searched for anywhere in the text. ``None`` uses
    :data:`DEFAULT_PATTERN` (YYYYMMDD or YYYY-MM-DD, as in Sentinel product names).

    Raises :class:`DateError` naming ``text`` when no date is found or the date does not exist
    (month 13, 30 February).
    """
    text = str(text)
    if isinstance(pattern, str) and "%" in pattern:
        return _parse_strptime(text, pattern)
    rx = DEFAULT_PATTERN if pattern is None else re.compile(pattern)
    m = rx.search(text)
    if m is None:
        raise DateError(f"no date found in {text!r} with pattern {rx.pattern!r}")
    groups = m.groupdict()
    try:
        if groups.get("date"):
            return _parse_compact(groups["date"])
        if groups.get("year") and groups.get("month") and groups.get("day"):
            return dt.date(int(groups["year"]), int(groups["month"]), int(groups["day"]))
        raise DateError(
            f"date pattern {rx.pattern!r} must have named groups year, month, day (or date)"
        )
    except ValueError as e:
        if isinstance(e, DateError):
            raise
        raise DateError(f"{m.group(0)!r} in {text!r} is not a valid date: {e}") from None


def _parse_compact(s: str) -> dt.date:
    digits = s.replace("-", "")
    if len(digits) != 8 or not digits.isdigit():
        raise DateError(f"{s!r} is not a YYYYMMDD date")
    return dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:8]))


def _parse_strptime(text: str, fmt: str) -> dt.date:
    # strptime cannot search, so turn the format into a regex that finds the candidate.
    rx = re.escape(fmt)
    for code, sub in (("%Y", r"\d{4}"), ("%m", r"\d{2}"), ("%d", r"\d{2}"), ("%j", r"\d{3}")):
        rx = rx.replace(re.escape(code), sub).replace(code, sub)
    for code, sub in (("%H", r"\d{2}"), ("%M", r"\d{2}"), ("%S", r"\d{2}"), ("%y", r"\d{2}")):
        rx = rx.replace(re.escape(code), sub).replace(code, sub)
    m = re.search(rx, text)
    if m is None:
        raise DateError(f"no date matching format {fmt!r} in {text!r}")
    try:
        return dt.datetime.strptime(m.group(0), fmt).date()
    except ValueError as e:
        raise DateError(f"{m.group(0)!r} in {text!r} is not a valid {fmt!r} date: {e}") from None


def date_from_tags(tags: dict) -> dt.date | None:
    """The acquisition date in a dataset's metadata tags, or None when it carries none.

    Raises :class:`DateError` when a date tag is present but unreadable.
    """
    for key in DATE_TAGS:
        value = tags.get(key)
        if value:
            # TIFFTAG_DATETIME is "YYYY:MM:DD HH:MM:SS"; the others ISO-like.
            v = str(value).strip().replace(":", "-", 2) if key == "TIFFTAG_DATETIME" else value
            return parse_date(v)
    return None


def date_from_sidecar(path: Path) -> dt.date | None:
    """A date that files beside ``path`` give for it, or None.

    Understood: BigEarthNet ``*_labels_metadata.json`` (``acquisition_date`` / ``acquisition_time``)
    in the same folder, and OSCD's ``dates.txt`` (``date_1: YYYYMMDD`` for the ``imgs_1``
    folder) in the parent folder.
    """
    path = Path(path)
    for meta in sorted(path.parent.glob("*_labels_metadata.json")):
        try:
            d = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        for key in ("acquisition_date", "acquisition_time"):
            if d.get(key):
                return parse_date(d[key])
    m = re.fullmatch(r"imgs?_(\d+)", path.parent.name)
    dates = path.parent.parent / "dates.txt"
    if m and dates.is_file():
        for line in dates.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == f"date_{m.group(1)}" and value.strip():
                return parse_date(value.strip())
    return None


def to_days(d: dt.date) -> int:
    """Days since 1970-01-01."""
    return (d - EPOCH).days


def from_days(days: int) -> dt.date:
    return EPOCH + dt.timedelta(days=int(days))


def day_of_year(days) -> np.ndarray:
    """Day of year (1..366, int64) of days since 1970-01-01 (an int array of any shape)."""
    days = np.asarray(days, dtype=np.int64)
    d64 = days.astype("datetime64[D]")
    year_start = d64.astype("datetime64[Y]").astype("datetime64[D]")
    return (d64 - year_start).astype(np.int64) + 1

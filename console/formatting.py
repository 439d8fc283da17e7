"""How the terminal commands write a value: one set of formatters for ``ugro watch``,
``ugro report`` and ``ugro compare``, so the same figure reads the same in each.

Every formatter takes ``None`` (and, for a measured quantity, NaN or ±Inf) for "not known" and
writes ``MISSING`` then, never ``0``. Units are those of the metrics: seconds, bytes, ratios in
0..1, Unix seconds.
"""

from __future__ import annotations

import datetime
import math
import time

# An en dash, not a hyphen: the report writes times before a job's start as "-3.0 s", and a
# missing value must not read as a minus sign.
MISSING = "–"


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def clock(seconds: float | None) -> str:
    """A running time as a clock: ``1:02:03``, ``2d 03:04:05`` (``ugro watch``)."""
    if not finite(seconds):
        return MISSING
    whole = round(max(0.0, seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{hours}:{minutes:02d}:{secs:02d}"


def duration(seconds: float | None) -> str:
    """A span in words: ``12.3 s``, ``4 min 05 s``, ``2 h 03 min``, ``1 d 02 h``."""
    if not finite(seconds):
        return MISSING
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    if whole < 86400:
        return f"{whole // 3600} h {whole % 3600 // 60:02d} min"
    return f"{whole // 86400} d {whole % 86400 // 3600:02d} h"


def span(seconds: float) -> str:
    """A window as PromQL and ``--lookback`` write it: ``7d``, ``36h``, ``90s``."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:.0f}s"


def ago(seconds: float) -> str:
    """How long ago: ``42s ago``, ``5m ago``, ``1.5h ago``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def timestamp(unix: float | None) -> str:
    """A moment in UTC: ``2027-01-15 08:00:00 UTC``."""
    if not finite(unix):
        return MISSING
    moment = datetime.datetime.fromtimestamp(unix, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def time_of_day(unix: float) -> str:
    """A moment as this machine's local clock shows it: ``08:00:00``."""
    return time.strftime("%H:%M:%S", time.localtime(unix))


def count(value: float | None) -> str:
    """A whole number with thousands separators: ``12,345``."""
    return f"{value:,.0f}" if finite(value) else MISSING


def rate(value: float | None) -> str:
    """A per-second rate: whole above 100 (``12,345``), three significant digits below."""
    if not finite(value):
        return MISSING
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def step_time(seconds: float | None) -> str:
    """``40.0 ms`` below a second, ``1.25 s`` above."""
    if not finite(seconds):
        return MISSING
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def loss(value: float | None, digits: int = 4) -> str:
    """A loss; a non-finite one as Prometheus writes it (``NaN``, ``+Inf``, ``-Inf``): that a
    loss went non-finite is news, not a missing value."""
    if value is None:
        return MISSING
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return f"{value:.{digits}f}"


def share(value: float | None, digits: int = 1) -> str:
    """A ratio in 0..1 as a percentage: ``87.5 %``."""
    return f"{100 * value:.{digits}f} %" if finite(value) else MISSING


def percent(value: float | None) -> str:
    """A value that already is a percentage: ``12.5 %``."""
    return f"{value:.1f} %" if finite(value) else MISSING


def ratio(value: float | None) -> str:
    """A ratio around 1 (a straggler score): ``0.97``."""
    return f"{value:.2f}" if finite(value) else MISSING


def factor(value: float | None) -> str:
    """An efficiency factor in 0..1; ``n/a`` when it was not measured (it then counts as 1,
    which is not the same as an unknown value)."""
    return "n/a" if value is None else f"{value:.2f}"


def learning_rate(value: float | None) -> str:
    return f"{value:.1e}" if finite(value) else MISSING


def gibibytes(value: float | None) -> str:
    return f"{value / 1024**3:.1f} GiB" if finite(value) else MISSING


def celsius(value: float | None) -> str:
    return f"{value:.1f} °C" if finite(value) else MISSING

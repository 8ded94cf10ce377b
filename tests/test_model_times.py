"""Times as every reply spells them (model.iso): exactly what datetime's isoformat() gives, faster."""

from __future__ import annotations

import datetime as dt

from hypothesis import example, given, settings
from hypothesis import strategies as st

from jobd.model import iso

# datetime's range, year 1 to 9999, in seconds from 1970
FIRST, LAST = -62_135_596_800.0, 253_402_300_799.0


def by_datetime(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat().replace("+00:00", "Z")


@settings(max_examples=3000, deadline=None)
@given(st.floats(min_value=FIRST, max_value=LAST, allow_nan=False))
@example(1_764_474_195.0)  # a whole second: no fraction, as isoformat() writes it
@example(1_764_474_195.5)
@example(1_764_474_195.9999996)  # rounds up into the next second
@example(1_764_474_195.0000005)  # exactly half a microsecond away from a whole one (as far as a double can say)
@example(0.0)
@example(-0.25)  # before 1970: the fraction counts back from the next second
@example(-1.9999996)
def test_iso_spells_a_time_as_datetime_does(timestamp: float) -> None:
    assert iso(timestamp) == by_datetime(timestamp)


def test_iso_of_times_within_one_second_and_across_seconds() -> None:
    """The cached second must not leak into the next one, in either direction."""
    base = 1_764_474_195.0
    for timestamp in (base + 0.1, base + 0.7, base + 1.2, base - 3.4, base + 0.1, base + 86_400.5):
        assert iso(timestamp) == by_datetime(timestamp)


def test_no_time_is_none() -> None:
    assert iso(None) is None

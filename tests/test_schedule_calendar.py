"""Calendar parsing and due times (jobd.engine.schedule): cron, seconds-first, macros, evQueue's format, DST,
and the pure next-run and catch-up decisions. Every time is given: nothing reads the clock."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
from zoneinfo import ZoneInfo

import pytest

from jobd.engine.schedule import MAX_STEP_BACK, Calendar, catch_up_due, next_run, still_due, waited_for
from jobd.localzone import LocalZone
from jobd.model import ScheduleDef, ScheduleState

PARIS = ZoneInfo("Europe/Paris")


def paris(*args: int, fold: int = 0) -> float:
    return dt.datetime(*args, tzinfo=PARIS, fold=fold).timestamp()  # type: ignore[misc]


def walls(text: str, start: float, count: int, zone: str = "Europe/Paris") -> list[str]:
    """The next `count` due times after `start`, as ISO times with their offset."""
    calendar = Calendar.parse(text)
    out = []
    for _ in range(count):
        start = calendar.next_after(start, zone)
        out.append(dt.datetime.fromtimestamp(start, ZoneInfo(zone)).isoformat())
    return out


# --- parsing ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("*/15 * * * *", ["2024-01-01T00:15:00+01:00", "2024-01-01T00:30:00+01:00"]),
        ("0 3 * * mon-fri", ["2024-01-01T03:00:00+01:00", "2024-01-02T03:00:00+01:00"]),
        ("*/20 * * * * *", ["2024-01-01T00:00:20+01:00", "2024-01-01T00:00:40+01:00"]),  # seconds first
        ("5 0 0 * * *", ["2024-01-01T00:00:05+01:00", "2024-01-02T00:00:05+01:00"]),
        ("@hourly", ["2024-01-01T01:00:00+01:00", "2024-01-01T02:00:00+01:00"]),
        ("@daily", ["2024-01-02T00:00:00+01:00", "2024-01-03T00:00:00+01:00"]),
        ("@midnight", ["2024-01-02T00:00:00+01:00", "2024-01-03T00:00:00+01:00"]),
        ("@weekly", ["2024-01-07T00:00:00+01:00", "2024-01-14T00:00:00+01:00"]),  # Sundays
        ("@monthly", ["2024-02-01T00:00:00+01:00", "2024-03-01T00:00:00+01:00"]),
        ("@yearly", ["2025-01-01T00:00:00+01:00", "2026-01-01T00:00:00+01:00"]),
        ("@annually", ["2025-01-01T00:00:00+01:00", "2026-01-01T00:00:00+01:00"]),
        # evQueue: 0-based day and month, Sunday = 0
        ("0;0;3;;;1,2,3,4,5", ["2024-01-01T03:00:00+01:00", "2024-01-02T03:00:00+01:00"]),
        ("0,30;;;;;", ["2024-01-01T00:00:30+01:00", "2024-01-01T00:01:00+01:00"]),
        (";;;;;", ["2024-01-01T00:00:01+01:00", "2024-01-01T00:00:02+01:00"]),
        ("0;0;12;0;1;", ["2024-02-01T12:00:00+01:00", "2025-02-01T12:00:00+01:00"]),  # 1st of February
        ("0;30;8;30;;", ["2024-01-31T08:30:00+01:00", "2024-03-31T08:30:00+02:00"]),  # the 31st, where it exists
        ("0;0;0", ["2024-01-02T00:00:00+01:00", "2024-01-03T00:00:00+01:00"]),  # missing levels: every value
        # evQueue's strtol() reads a sign, and its parser skips a comma after each value: refused before as non-numeric
        ("0,30,;;;;;", ["2024-01-01T00:00:30+01:00", "2024-01-01T00:01:00+01:00"]),
        ("+0;+30,;+3,;;;", ["2024-01-01T03:30:00+01:00", "2024-01-02T03:30:00+01:00"]),
        ("-0;0;;;;+6", ["2024-01-06T00:00:00+01:00", "2024-01-06T01:00:00+01:00"]),  # Saturdays, hourly
        # Blanks around values and separators are ignored (evQueue's strtol() skips those before a value), and a
        # level of blanks is empty; `1, ` is `1,`, whose comma evQueue skips.
        ("0, 30;;;;;", ["2024-01-01T00:00:30+01:00", "2024-01-01T00:01:00+01:00"]),
        (" 0 , 30 ;\t; ;;;", ["2024-01-01T00:00:30+01:00", "2024-01-01T00:01:00+01:00"]),
        ("0;1, ;;;;", ["2024-01-01T00:01:00+01:00", "2024-01-01T01:01:00+01:00"]),
        # evQueue skips one `;` after the 6th level too
        (";;;;;;", ["2024-01-01T00:00:01+01:00", "2024-01-01T00:00:02+01:00"]),
        ("0;0;3;;;1,2,3,4,5; ", ["2024-01-01T03:00:00+01:00", "2024-01-02T03:00:00+01:00"]),
    ],
)
def test_due_times(text: str, expected: list[str]) -> None:
    assert walls(text, paris(2024, 1, 1, 0, 0, 0), 2) == expected


# Each refusal starts with evQueue's message, word for word, then names the value and the level.
NON_NUMERIC_IN_MIN = "in MIN, the 2nd level (comma-separated integers)"
FORMAT = "(the format is SEC;MIN;HOUR;DAY;MONTH;WDAY)"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "Empty schedule"),
        ("   ", "Empty schedule"),
        ("0;*;;;;", f"Non numeric data in schedule offset: '*' {NON_NUMERIC_IN_MIN}"),
        ("0;1-5;;;;", f"Non numeric data in schedule offset: '1-5' {NON_NUMERIC_IN_MIN}"),
        ("0;*/5;;;;", f"Non numeric data in schedule offset: '*/5' {NON_NUMERIC_IN_MIN}"),
        ("0;a;;;;", f"Non numeric data in schedule offset: 'a' {NON_NUMERIC_IN_MIN}"),
        ("0;1,,2;;;;", f"Non numeric data in schedule offset: an empty value {NON_NUMERIC_IN_MIN}"),
        # evQueue skips ONE comma after a value: a comma with no value before it is non-numeric to it too
        ("0;1,,;;;;", f"Non numeric data in schedule offset: an empty value {NON_NUMERIC_IN_MIN}"),
        ("0;,1;;;;", f"Non numeric data in schedule offset: an empty value {NON_NUMERIC_IN_MIN}"),
        ("0;,;;;;", f"Non numeric data in schedule offset: an empty value {NON_NUMERIC_IN_MIN}"),
        ("0;1, ,2;;;;", f"Non numeric data in schedule offset: an empty value {NON_NUMERIC_IN_MIN}"),
        ("0;++1;;;;", f"Non numeric data in schedule offset: '++1' {NON_NUMERIC_IN_MIN}"),
        ("0;+-1;;;;", f"Non numeric data in schedule offset: '+-1' {NON_NUMERIC_IN_MIN}"),
        # a blank inside a value is no separator; nor is a blank that is not ASCII (strtol() skips none)
        ("0;1 2;;;;", f"Non numeric data in schedule offset: '1 2' {NON_NUMERIC_IN_MIN}"),
        ("0;+ 5;;;;", f"Non numeric data in schedule offset: '+ 5' {NON_NUMERIC_IN_MIN}"),
        ("0;\u00a05;;;;", f"Non numeric data in schedule offset: '\\xa05' {NON_NUMERIC_IN_MIN}"),
        ("0;+60;;;;", "Out of range schedule offset: +60 in MIN, the 2nd level (0 to 59)"),
        ("60;;;;;", "Out of range schedule offset: 60 in SEC, the 1st level (0 to 59)"),
        (";60;;;;", "Out of range schedule offset: 60 in MIN, the 2nd level (0 to 59)"),
        (";;24;;;", "Out of range schedule offset: 24 in HOUR, the 3rd level (0 to 23)"),
        # day 31 would be the 32nd
        (";;;31;;", "Out of range schedule offset: 31 in DAY, the 4th level (0 to 30, for the 1st to the 31st)"),
        (";;;;12;", "Out of range schedule offset: 12 in MONTH, the 5th level (0 to 11, for January to December)"),
        (";;;;;7", "Out of range schedule offset: 7 in WDAY, the 6th level (0 to 6, Sunday 0)"),
        (";;;-1;;", "Out of range schedule offset: -1 in DAY, the 4th level (0 to 30, for the 1st to the 31st)"),
        (";;;;;;;", f"Garbage at end of schedule: ';' after the 6th level, WDAY {FORMAT}"),
        (";;;;;; x", f"Garbage at end of schedule: 'x' after the 6th level, WDAY {FORMAT}"),
        ("0;0;0;0;0;0;0", f"Garbage at end of schedule: '0' after the 6th level, WDAY {FORMAT}"),
        (
            ";;;30;1;",  # 31 February
            "Schedule constraints are impossible to satisfy: none of the months of MONTH has one of the days of DAY "
            "(day 0 is the 1st): February has 29 days at most",
        ),
        (";;;29;1;", "Schedule constraints are impossible to satisfy: none of the months"),  # 30 February
        (
            ";;;30;1,3,5,8,10;",  # months without a 31st
            "Schedule constraints are impossible to satisfy: none of the months of MONTH has one of the days of DAY "
            "(day 0 is the 1st): February has 29 days at most, April has 30 days, June has 30 days, September has 30 "
            "days, November has 30 days",
        ),
        # cron too, naming the fields as written
        (
            "0 0 30 2 *",
            "Schedule constraints are impossible to satisfy: none of the months of MONTH '2' has one of the days of "
            "DAY '30': February has 29 days at most",
        ),
        (
            "0 0 0 31 apr,jun-sep/3 */2",  # seconds first; a WDAY starting with * is ANDed, as a star
            "Schedule constraints are impossible to satisfy: none of the months of MONTH 'apr,jun-sep/3' has one of "
            "the days of DAY '31': April has 30 days, June has 30 days, September has 30 days",
        ),
        (
            "0 0 15W 2 */8",  # the weekday nearest the 15th, on Sundays only
            "Schedule constraints are impossible to satisfy: no day matches DAY '15W', MONTH '2' and WDAY '*/8' "
            "(none in 400 years, after which the calendar's dates fall on the same weekdays again)",
        ),
        (
            "0 0 */3 2 5#5",  # a WDAY starting with * is ANDed: the 1st, 4th... 28th of February is no fifth Friday
            "Schedule constraints are impossible to satisfy: no day matches DAY '*/3', MONTH '2' and WDAY '5#5' (none "
            "in 400 years",
        ),
        # A space inside a cron list, range or step makes two fields of it: croniter's word shows its own rotated
        # copy of the fields (`[30 * * * * 0,]`).
        (
            "0, 30 * * * *",
            "invalid cron expression: field 1, SEC of 6 fields, '0,', ends with ',': a space ends a field, so a "
            "list, range or step is written without one (0,30 or 1-5 or */5, not 0, 30)",
        ),
        ("0 ,30 * * * *", "invalid cron expression: field 2, MIN of 6 fields, ',30', starts with ',': a space ends"),
        ("*/ 5 * * *", "invalid cron expression: field 1, MIN of 5 fields, '*/', ends with '/': a space ends"),
        ("1 - 5 * * * *", "invalid cron expression: field 2, '-', starts with '-'"),  # 7 fields: no names
        ("0, 30 * * * * *", "invalid cron expression: field 1, '0,', ends with ','"),  # 7 fields: no names
    ],
)
def test_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        Calendar.parse(text)
    assert str(raised.value).startswith(message)  # most in full; a few only as far as the point they make


@pytest.mark.parametrize(
    "text",
    ["1 2 3", "* * * * * * *", "@sometimes", "a b c d e", "61 * * * *", "* 25 * * *"],
)
def test_bad_cron(text: str) -> None:
    with pytest.raises(ValueError):
        Calendar.parse(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("60 * * * *", "MIN field '60' is not valid: MIN takes 0-59, lists, ranges and steps"),
        ("0 24 * * *", "HOUR field '24' is not valid: HOUR takes 0-23"),
        ("0 0 0 * *", "DAY field '0' is not valid: DAY takes 1-31"),
        ("0 0 1 January *", "MONTH field 'January' is not valid: MONTH takes 1-12 or jan-dec"),
        ("0 0 * * Monday", "WDAY field 'Monday' is not valid: WDAY takes 0-7 (0 and 7 are Sunday) or sun-sat"),
        ("60 0 * * * *", "SEC field '60' is not valid: SEC takes 0-59"),
        ("0 0 * * 1,", "WDAY field '1,' is not valid"),
        (
            "0 0 * * 7/2",  # croniter read it as 0/2: Sunday, Tuesday, Thursday, Saturday
            "WDAY field '7/2' is not valid: '7/2' is a step from 7, Sunday, the last value, which reaches no other "
            "day; write 7 for Sundays, or */2 to step through the week from Sunday",
        ),
        ("0 0 0 * * 1,07/1", "WDAY field '1,07/1' is not valid: '07/1' is a step from 7, Sunday, the last value"),
        # Digits that are not ASCII (str.isdigit() says they are digits; int() refused "⁷", "¹": that was the message)
        ("0 0 * * \u2077/2", "WDAY field '\u2077/2' is not valid: WDAY takes 0-7 (0 and 7 are Sunday) or sun-sat"),
        ("0 3 \u00b9-\u00b9 * *", "DAY field '\u00b9-\u00b9' is not valid: DAY takes 1-31"),
        ("0 \u0663 * * *", "HOUR field '\u0663' is not valid: HOUR takes 0-23"),
        ("daily", "found 1; did you mean @daily?"),
        ("*-*-* 02:30:00", "systemd's OnCalendar= syntax is not read: `*-*-* 02:30:00` is cron's `30 2 * * *`"),
        ("Mon..Fri 09:00", "systemd's OnCalendar= syntax is not read"),
        ("@reboot", "unknown macro @reboot (schedules run at calendar times; jobd has no start-up macro)"),
        # A line of /etc/cron.d pasted whole, or with its user: the sixth field was refused as a weekday.
        (
            "15 2 * * 1-5 www-data",
            "this looks like a crontab line, not a calendar: the calendar is its five time fields, '15 2 * * 1-5'; "
            "what follows them ('www-data'…) goes in the task: a user field (/etc/crontab, /etc/cron.d) is its "
            "`user`, the command its `command`",
        ),
        ("*/5 * * * * root /usr/local/bin/sync --all", "the calendar is its five time fields, '*/5 * * * *'"),
        ("15 2 * * 1-5 /usr/bin/report", "what follows them ('/usr/bin/report'…) goes in the task"),
    ],
)
def test_a_bad_cron_calendar_is_refused_naming_the_field_and_what_it_takes(text: str, message: str) -> None:
    """croniter's own words name neither the field nor its values (`[0 0 1 january *] is not acceptable`); an
    administrator moving a crontab or a systemd timer over is told which field is wrong and what it takes."""
    with pytest.raises(ValueError) as raised:
        Calendar.parse(text)
    assert message in str(raised.value)


@pytest.mark.parametrize("text", ["0 3 * * * mon", "0 30 2 * * 1-5", "*/10 * * * * *"])
def test_six_fields_whose_last_is_a_weekday_are_seconds_first_not_a_crontab_line(text: str) -> None:
    assert Calendar.parse(text).seconds_first


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0 3-3 * * *", ["2024-09-01T03:00:00+02:00", "2024-09-02T03:00:00+02:00"]),
        ("0 0 * * 7-7", ["2024-09-08T00:00:00+02:00", "2024-09-15T00:00:00+02:00"]),  # Sundays
        ("0 0 * * mon-MON", ["2024-09-02T00:00:00+02:00", "2024-09-09T00:00:00+02:00"]),
        ("0 0 * * 5-5/2", ["2024-09-06T00:00:00+02:00", "2024-09-13T00:00:00+02:00"]),
    ],
)
def test_a_range_whose_ends_are_the_same_is_that_one_value(text: str, expected: list[str]) -> None:
    """cron reads `3-3` as 3; croniter reads it as the whole cycle: `0 3-3 * * *` ran every hour, `7-7` every day."""
    assert walls(text, paris(2024, 9, 1, 0, 0, 0), 2) == expected


def days_of_week(text: str) -> set[int]:
    """The weekdays (0 Sunday to 6 Saturday) on which a calendar fires in one week."""
    sunday = dt.datetime(2024, 9, 1, tzinfo=dt.UTC).timestamp()
    calendar, moment, days = Calendar.parse(text), sunday - 1, set()
    while (moment := calendar.next_after(moment, "UTC")) < sunday + 7 * 86400:
        days.add(dt.datetime.fromtimestamp(moment, dt.UTC).isoweekday() % 7)
    return days


def test_weekdays_with_seven_are_read_as_cronie_reads_them() -> None:
    """cronie's WDAY takes 0 to 7, both Sunday: a range or a star with a step is expanded over 0-7 (`*/2` is
    0, 2, 4, 6; `1-7/2` is 1, 3, 5, 7), then 7 counts as 0. Every range and step of that field, against that rule
    (ranges that wrap, `5-1`, are croniter's, which cronie refuses)."""
    fields = {f"*/{step}": range(0, 8, step) for step in range(1, 9)}
    for low, high, step in itertools.product(range(8), range(8), range(1, 9)):
        if low <= high:
            fields[f"{low}-{high}/{step}"] = range(low, high + 1, step)
    for field, values in fields.items():
        assert days_of_week(f"0 0 * * {field}") == {value % 7 for value in values}, field
    assert days_of_week("0 0 * * 7") == days_of_week("0 0 * * 7-7") == {0}
    assert days_of_week("0 0 * * 5-7") == days_of_week("0 0 * * fri-7") == {5, 6, 0}


@pytest.mark.parametrize(
    "text", ["R * * * *", "0 R * * *", "R/5 * * * * *", "0 0 1 r *", "H(0-5) * * * *", "0 0 * * 1,R"]
)
def test_random_and_hashed_values_are_refused(text: str) -> None:
    """croniter's R is drawn again each time the expression is read, and jobd reads it at every next time: `R * * *
    *` (once an hour at a random minute, as a Jenkins user means it) fired at a new minute after each firing, several
    times an hour, and its listed next time changed at each reload. H (hashed) failed with croniter's own words."""
    with pytest.raises(ValueError, match=r"random \(R\) and hashed \(H\) values are not supported"):
        Calendar.parse(text)


def test_names_are_not_random_values() -> None:
    assert walls("0 0 1 mar thu", paris(2024, 1, 1, 0, 0, 0), 2) == [
        "2024-03-01T00:00:00+01:00",
        "2024-03-07T00:00:00+01:00",
    ]


def test_feb_29_is_possible() -> None:
    """The 29th of February exists in leap years: evQueue's day 28 in month 1 is accepted."""
    assert walls("0;0;0;28;1;", paris(2025, 1, 1, 0, 0, 0), 1) == ["2028-02-29T00:00:00+01:00"]


def dates(text: str, start: dt.datetime, count: int) -> list[str]:
    """The next `count` due dates (UTC) after `start`, with their weekday."""
    calendar, moment, out = Calendar.parse(text), start.timestamp(), []
    for _ in range(count):
        moment = calendar.next_after(moment, "UTC")
        out.append(dt.datetime.fromtimestamp(moment, dt.UTC).strftime("%Y-%m-%d %a"))
    return out


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Refused as never due: croniter's own OR kept `#` on both sides (the 1st AND a fifth Friday), and gave up.
        ("0 0 1 2 5#5", ["2024-02-01 Thu", "2025-02-01 Sat", "2026-02-01 Sun", "2027-02-01 Mon"]),
        ("0 0 1 * 5#5", ["2024-02-01 Thu", "2024-03-01 Fri", "2024-03-29 Fri", "2024-04-01 Mon"]),
        ("0 0 30 2 5#5", ["2036-02-29 Fri", "2064-02-29 Fri", "2092-02-29 Fri", "2104-02-29 Fri"]),  # 5th Fridays
        ("0 0 31 2 1#5", ["2044-02-29 Mon", "2072-02-29 Mon", "2112-02-29 Mon", "2140-02-29 Mon"]),  # 40 years once
        ("0 0 31 4 5#5", ["2027-04-30 Fri", "2032-04-30 Fri", "2033-04-29 Fri", "2038-04-30 Fri"]),
        ("0 0 1,31 2 5#1", ["2024-02-01 Thu", "2024-02-02 Fri", "2025-02-01 Sat", "2025-02-07 Fri"]),
        ("0 0 30 2 L5", ["2024-02-23 Fri", "2025-02-28 Fri", "2026-02-27 Fri", "2027-02-26 Fri"]),  # last Friday
        ("0 0 15W 2 0", ["2024-02-04 Sun", "2024-02-11 Sun", "2024-02-15 Thu", "2024-02-18 Sun"]),  # W and Sundays
        # Not refused, but wrong: the days of DAY were lost (only the fifth Friday; 15W and no Monday).
        ("0 0 L 2 5#5", ["2024-02-29 Thu", "2025-02-28 Fri", "2026-02-28 Sat", "2027-02-28 Sun"]),
        ("0 0 10W * 1", ["2024-01-08 Mon", "2024-01-10 Wed", "2024-01-15 Mon", "2024-01-22 Mon"]),
        ("0 0 16W 3 1", ["2024-03-04 Mon", "2024-03-11 Mon", "2024-03-15 Fri", "2024-03-18 Mon"]),
        # A day that exists in leap years only, ANDed (a WDAY starting with *) or alone: every 4 years, or 28 to 40.
        ("0 0 29 2 *", ["2024-02-29 Thu", "2028-02-29 Tue", "2032-02-29 Sun", "2036-02-29 Fri"]),
        ("0 0 29 2 */7", ["2032-02-29 Sun", "2060-02-29 Sun", "2088-02-29 Sun", "2128-02-29 Sun"]),
    ],
)
def test_a_day_or_weekday_calendar_with_l_w_or_nth_weekday_fires_on_either(text: str, expected: list[str]) -> None:
    """Both restricted (neither starts with `*`), DAY and WDAY are ORed, as jobd documents (cronie's rule), also with
    croniter's `L`, `15W`, `5#5` (fifth Friday) and `L5` (last Friday): jobd unites the two sides itself."""
    assert dates(text, dt.datetime(2024, 1, 1, tzinfo=dt.UTC), 4) == expected


def test_next_after_is_strictly_after() -> None:
    calendar = Calendar.parse("*/10 * * * * *")
    at = paris(2024, 1, 1, 0, 0, 10)
    assert calendar.next_after(at, "Europe/Paris") == at + 10
    assert calendar.next_after(at - 0.5, "Europe/Paris") == at
    assert calendar.next_after(at + 0.5, "Europe/Paris") == at + 10


@pytest.mark.parametrize("value", ["Mars/Olympus", "Europe", ":America"])
def test_a_tz_that_names_no_zone_is_left_for_the_machines_zone(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """TZ=Europe (a directory of zones) stopped jobd's start with IsADirectoryError; unknown names were already
    passed over for /etc/localtime."""
    monkeypatch.setenv("TZ", "")
    machines = LocalZone()()
    monkeypatch.setenv("TZ", value)
    zone = LocalZone()()
    assert type(zone) is type(machines) and str(zone) == str(machines)


@pytest.mark.parametrize("value", [":/usr/share/zoneinfo/Asia/Kolkata", "/usr/share/zoneinfo/Asia/Kolkata"])
def test_a_tz_that_gives_a_zone_files_path_is_that_zone(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """glibc reads TZ=:/path/of/a/zone/file (tzset(3)); jobd took it for no zone and read its calendars in
    /etc/localtime's zone, while its jobs, which inherit TZ, and the rest of the machine were in Kolkata's."""
    monkeypatch.setenv("TZ", value)
    zone = LocalZone()()
    assert zone.utcoffset(dt.datetime(2024, 1, 1)) == dt.timedelta(hours=5, minutes=30)


def test_timezone_changes_the_instant() -> None:
    calendar = Calendar.parse("0 9 * * *")
    start = paris(2024, 6, 1, 0, 0, 0)
    assert calendar.next_after(start, "Europe/Paris") == paris(2024, 6, 1, 9, 0, 0)
    assert calendar.next_after(start, "UTC") == dt.datetime(2024, 6, 1, 9, tzinfo=dt.UTC).timestamp()
    assert calendar.next_after(start, "America/New_York") == paris(2024, 6, 1, 15, 0, 0)


# --- day and weekday: evQueue ANDs, cron ORs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "evqueue"),
    [
        ("0 0 15 * *", "0;0;0;14;;"),
        ("0 0 15W * *", None),  # the weekday nearest the 15th: evQueue's format has no word for it (was a plain 15th)
        ("0 0 L * *", None),
        ("0 0 * * 5#2", None),
    ],
)
def test_evqueue_text_is_given_only_when_evqueues_format_can_say_it(text: str, evqueue: str | None) -> None:
    assert Calendar.parse(text).evqueue_text() == evqueue


def test_evqueue_ands_day_and_weekday() -> None:
    # The 13th (day 12) that is a Friday (5): 13 September and 13 December 2024.
    assert walls("0;0;0;12;;5", paris(2024, 1, 1, 0, 0, 0), 2) == [
        "2024-09-13T00:00:00+02:00",
        "2024-12-13T00:00:00+01:00",
    ]


def test_cron_ors_day_and_weekday() -> None:
    # The 13th OR any Friday.
    assert walls("0 0 13 * 5", paris(2024, 9, 1, 0, 0, 0), 3) == [
        "2024-09-06T00:00:00+02:00",
        "2024-09-13T00:00:00+02:00",
        "2024-09-20T00:00:00+02:00",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # An odd day that is a Friday: `*/2` starts with `*`, so cron ANDs it with the weekday.
        ("0 0 */2 * 5", ["2024-09-13T00:00:00+02:00", "2024-09-27T00:00:00+02:00", "2024-10-11T00:00:00+02:00"]),
        # The 13th that is a Sunday, Tuesday, Thursday or Saturday.
        ("0 0 13 * */2", ["2024-10-13T00:00:00+02:00", "2025-02-13T00:00:00+01:00", "2025-03-13T00:00:00+01:00"]),
    ],
)
def test_cron_ands_day_and_weekday_when_one_starts_with_a_star(text: str, expected: list[str]) -> None:
    """Vixie cron and cronie OR day and weekday only when neither field starts with `*`: `*/2` is a star for that
    rule, and the day must match both. jobd ORed them (every odd day, and every Friday)."""
    assert walls(text, paris(2024, 9, 1, 0, 0, 0), 3) == expected


def test_a_cron_and_of_day_and_weekday_has_its_evqueue_text() -> None:
    assert Calendar.parse("0 0 */2 * 5").evqueue_text() == "0;0;0;" + ",".join(map(str, range(0, 31, 2))) + ";;5"


def test_evqueue_and_over_decades() -> None:
    """29 February that is a Monday: possible, decades apart."""
    assert walls("0;0;0;28;1;1", paris(2024, 3, 1, 0, 0, 0), 1) == ["2044-02-29T00:00:00+01:00"]


# --- DST (Europe/Paris: 31 March 2024 02:00 → 03:00, 27 October 2024 03:00 → 02:00) -------------------------------


def test_spring_forward_fixed_time_runs_at_the_jump() -> None:
    assert walls("30 2 * * *", paris(2024, 3, 30, 12, 0, 0), 2) == [
        "2024-03-31T03:00:00+02:00",
        "2024-04-01T02:30:00+02:00",
    ]


@pytest.mark.parametrize(
    ("calendar", "next_day"),
    [("30 30 2 * * *", "02:30:30"), ("30;30;2;;;", "02:30:30"), ("59 59 2 * * *", "02:59:59")],
)
def test_spring_forward_a_fixed_time_with_seconds_runs_at_the_jump_not_seconds_after_it(
    calendar: str, next_day: str
) -> None:
    """croniter moves a skipped time on by whole minutes until it exists: 02:30:30 became 03:00:30, 02:59:59 became
    03:00:59, not the jump (03:00:00) the documentation promises for a fixed time the jump skips."""
    assert walls(calendar, paris(2024, 3, 30, 12, 0, 0), 2) == [
        "2024-03-31T03:00:00+02:00",
        f"2024-04-01T{next_day}+02:00",
    ]


def test_spring_forward_every_second_has_no_gap_or_repeat() -> None:
    start = paris(2024, 3, 31, 1, 59, 58)
    calendar = Calendar.parse(";;;;;")
    times = [start]
    for _ in range(4):
        times.append(calendar.next_after(times[-1], "Europe/Paris"))
    assert [b - a for a, b in itertools.pairwise(times)] == [1, 1, 1, 1]
    assert dt.datetime.fromtimestamp(times[2], PARIS).isoformat() == "2024-03-31T03:00:00+02:00"


def test_spring_forward_hourly() -> None:
    assert walls("@hourly", paris(2024, 3, 31, 0, 30, 0), 3) == [
        "2024-03-31T01:00:00+01:00",
        "2024-03-31T03:00:00+02:00",
        "2024-03-31T04:00:00+02:00",
    ]


@pytest.mark.parametrize(
    ("calendar", "expected"),
    [
        ("0 0 */2 * * *", ["2024-03-31T00:00:00+01:00", "2024-03-31T04:00:00+02:00", "2024-03-31T06:00:00+02:00"]),
        ("30 */2 * * *", ["2024-03-31T00:30:00+01:00", "2024-03-31T04:30:00+02:00", "2024-03-31T06:30:00+02:00"]),
        ("30 * * * *", ["2024-03-31T00:30:00+01:00", "2024-03-31T01:30:00+01:00", "2024-03-31T03:30:00+02:00"]),
        ("0;0;;;;", ["2024-03-31T00:00:00+01:00", "2024-03-31T01:00:00+01:00", "2024-03-31T03:00:00+02:00"]),
    ],
)
def test_spring_forward_every_hour_goes_on_at_the_new_clocks_times(calendar: str, expected: list[str]) -> None:
    """An every-hour calendar stepping over the skipped hour: `0 */2 * * *` ran at 03:00 (croniter's stand-in for
    02:00) and again at 04:00, an hour later, while `30 * * * *` ran nothing at the jump for its 02:30."""
    assert walls(calendar, paris(2024, 3, 30, 23, 59, 0), 3) == expected


def test_fall_back_fixed_time_runs_once() -> None:
    assert walls("30 2 * * *", paris(2024, 10, 26, 12, 0, 0), 2) == [
        "2024-10-27T02:30:00+02:00",
        "2024-10-28T02:30:00+01:00",
    ]
    assert walls("0;30;2;;;", paris(2024, 10, 26, 12, 0, 0), 2) == [
        "2024-10-27T02:30:00+02:00",
        "2024-10-28T02:30:00+01:00",
    ]


@pytest.mark.parametrize("calendar", ["0 * * * *", "0 */1 * * *"])  # `*/1` is every hour too (was run once)
def test_fall_back_hourly_runs_in_both_passes(calendar: str) -> None:
    assert walls(calendar, paris(2024, 10, 27, 1, 30, 0), 4) == [
        "2024-10-27T02:00:00+02:00",
        "2024-10-27T02:00:00+01:00",
        "2024-10-27T03:00:00+01:00",
        "2024-10-27T04:00:00+01:00",
    ]


@pytest.mark.parametrize("calendar", ["*/30 2 * * *", "0 */30 2 * * *"])
def test_fall_back_a_wildcard_minute_runs_in_both_passes(calendar: str) -> None:
    """Vixie cron's "wildcard" jobs are those whose minute or hour field starts with `*`: they run at the clock's
    times as they come, the repeated hour included. jobd looked at the hour field alone and ran `*/30 2 * * *`
    in the first pass only."""
    assert walls(calendar, paris(2024, 10, 27, 1, 30, 0), 5) == [
        "2024-10-27T02:00:00+02:00",
        "2024-10-27T02:30:00+02:00",
        "2024-10-27T02:00:00+01:00",
        "2024-10-27T02:30:00+01:00",
        "2024-10-28T02:00:00+01:00",
    ]


def test_fall_back_an_empty_evqueue_minute_runs_in_both_passes() -> None:
    assert walls("0;;2;;;", paris(2024, 10, 27, 2, 58, 30), 3) == [
        "2024-10-27T02:59:00+02:00",
        "2024-10-27T02:00:00+01:00",
        "2024-10-27T02:01:00+01:00",
    ]


@pytest.mark.parametrize("calendar", ["*/30 2 * * *", "*/30 0 2 * * *"])
def test_spring_forward_a_wildcard_minute_or_second_goes_on_at_the_new_clocks_times(calendar: str) -> None:
    """As Vixie cron schedules its wildcard jobs: the times the jump skipped are not run at the jump."""
    assert walls(calendar, paris(2024, 3, 30, 12, 0, 0), 2)[0].startswith("2024-04-01T02:00:")


def test_fall_back_every_second_has_no_gap() -> None:
    start = paris(2024, 10, 27, 2, 59, 58)
    calendar = Calendar.parse("* * * * * *")
    times = [start]
    for _ in range(4):
        times.append(calendar.next_after(times[-1], "Europe/Paris"))
    assert [b - a for a, b in itertools.pairwise(times)] == [1, 1, 1, 1]
    # From inside the second pass, it continues there.
    second_pass = paris(2024, 10, 27, 2, 10, 0, fold=1)
    assert calendar.next_after(second_pass, "Europe/Paris") == second_pass + 1


# --- decisions ----------------------------------------------------------------------------------------------------

DEFINITION = ScheduleDef(name="s", calendar="0 * * * *", target_kind="task", target="t", jitter=60.0)
HOURLY = Calendar.parse(DEFINITION.calendar)
T0 = paris(2024, 1, 1, 10, 0, 0)


def test_next_run_with_jitter() -> None:
    state = ScheduleState("s")
    assert next_run(DEFINITION, HOURLY, state, T0, 0.0) == T0 + 3600
    assert next_run(DEFINITION, HOURLY, state, T0, 0.5) == T0 + 3600 + 30
    assert next_run(DEFINITION, HOURLY, state, T0 + 1, 0.25) == T0 + 3600 + 15
    no_jitter = dataclasses.replace(DEFINITION, jitter=0.0)
    assert next_run(no_jitter, HOURLY, state, T0, 0.9) == T0 + 3600


def test_a_clock_set_back_does_not_fire_a_due_time_again() -> None:
    """The next time was counted from "now" alone: a daily 02:00 job that had fired ran again at 02:00 when the
    clock was set back across it, by an NTP step of a second as well as by an hour."""
    daily = dataclasses.replace(DEFINITION, calendar="0 2 * * *", timezone="Europe/Paris", jitter=0.0)
    calendar = Calendar.parse(daily.calendar)
    at_two = paris(2024, 1, 1, 2, 0, 0)
    fired = ScheduleState("s", last_run=at_two + 0.01, last_due=at_two)
    tomorrow = at_two + 86400
    assert next_run(daily, calendar, fired, at_two + 0.01, 0.0) == tomorrow  # as before: after the firing
    assert next_run(daily, calendar, fired, at_two - 0.99, 0.0) == tomorrow  # an NTP step back of one second
    assert next_run(daily, calendar, fired, at_two - 3600, 0.0) == tomorrow  # an hour back
    assert next_run(daily, calendar, fired, at_two - MAX_STEP_BACK, 0.0) == tomorrow  # the bound is included
    # Further back the clock is taken as it is (a clock set years ahead, corrected): 02:00 may come again.
    assert next_run(daily, calendar, fired, at_two - MAX_STEP_BACK - 1, 0.0) == at_two
    # Never fired by its calendar (new, or only triggered): counted from now.
    assert next_run(daily, calendar, ScheduleState("s", last_run=at_two + 5), at_two - 60, 0.0) == at_two
    # A calendar firing every second is silent until the clock is back at the due time it last fired.
    every_second = dataclasses.replace(daily, calendar="* * * * * *")
    seconds = Calendar.parse(every_second.calendar)
    assert next_run(every_second, seconds, fired, at_two - 10, 0.0) == at_two + 1
    assert next_run(every_second, seconds, fired, at_two + 10, 0.0) == at_two + 11  # forward: from now


def test_next_run_disabled_or_suspended() -> None:
    state = ScheduleState("s")
    disabled = dataclasses.replace(DEFINITION, enabled=False)
    assert next_run(disabled, HOURLY, state, T0, 0.0) is None
    assert next_run(disabled, HOURLY, dataclasses.replace(state, enabled=True), T0, 0.0) == T0 + 3600  # API wins
    assert next_run(DEFINITION, HOURLY, dataclasses.replace(state, enabled=False), T0, 0.0) is None
    assert next_run(DEFINITION, HOURLY, dataclasses.replace(state, suspended=True), T0, 0.0) is None


def test_catch_up() -> None:
    on = dataclasses.replace(DEFINITION, catch_up=True)
    ran = ScheduleState("s", last_run=T0 + 5, after_run=True)  # its next time was to come at its run's end
    assert catch_up_due(on, HOURLY, ran, T0 + 3000) is False  # next due (11:00) not reached
    assert catch_up_due(on, HOURLY, ran, T0 + 3600) is True  # 11:00 is now: the timer would miss it
    assert catch_up_due(on, HOURLY, ran, T0 + 86400 * 3) is True  # many missed: still one run (a bool)
    assert catch_up_due(DEFINITION, HOURLY, ran, T0 + 86400) is False  # catch_up off
    assert catch_up_due(on, HOURLY, dataclasses.replace(ran, suspended=True), T0 + 86400) is False
    assert catch_up_due(on, HOURLY, dataclasses.replace(ran, enabled=False), T0 + 86400) is False
    # Never ran: the remembered next run decides; never armed: nothing missed.
    assert catch_up_due(on, HOURLY, ScheduleState("s", next_run=T0 + 3600), T0 + 7200) is True
    assert catch_up_due(on, HOURLY, ScheduleState("s", next_run=T0 + 3600), T0 + 60) is False
    assert catch_up_due(on, HOURLY, ScheduleState("s"), T0 + 86400) is False


def test_a_due_time_delayed_by_jitter_past_a_restart_is_kept() -> None:
    """Restarted after 11:00 but before 11:00 plus its jitter, jobd computed the next time from now: 12:00 plus a
    new jitter, and the 11:00 run was lost (with catch_up too: nothing was missed yet). The time waited for is kept
    while it is still to come and still a time of the calendar."""
    waiting = ScheduleState("s", last_run=T0 + 5, last_due=T0, next_run=T0 + 3600 + 40)  # 11:00:40
    assert waited_for(DEFINITION, HOURLY, waiting, T0 + 3600 + 1) == T0 + 3600 + 40  # restarted at 11:00:01
    assert waited_for(DEFINITION, HOURLY, waiting, T0 + 3000) == T0 + 3600 + 40  # before 11:00: the same
    assert waited_for(DEFINITION, HOURLY, waiting, T0 + 3600 + 40) is None  # passed: catch_up's business
    assert waited_for(dataclasses.replace(DEFINITION, jitter=10.0), HOURLY, waiting, T0 + 3601) is None  # changed
    assert waited_for(DEFINITION, Calendar.parse("30 * * * *"), waiting, T0 + 3601) is None  # another calendar
    assert waited_for(DEFINITION, HOURLY, dataclasses.replace(waiting, suspended=True), T0 + 3601) is None
    fired = dataclasses.replace(waiting, last_due=T0 + 3600 + 40)  # fired already (the clock set back since)
    assert waited_for(DEFINITION, HOURLY, fired, T0 + 3601) is None
    assert waited_for(DEFINITION, HOURLY, ScheduleState("s"), T0) is None  # never armed
    # The clock set back while jobd was down: every saved time is ahead of it. By an hour (at most MAX_STEP_BACK),
    # the next time counts from the due time last fired, and is the one kept; by two days, from now: not kept.
    assert waited_for(DEFINITION, HOURLY, waiting, T0 - 3600 + 1) == T0 + 3600 + 40
    assert waited_for(DEFINITION, HOURLY, waiting, T0 - 2 * 86400 + 1) is None


def test_a_recompute_keeps_the_due_time_whose_calendar_time_has_come_and_draws_the_others_again() -> None:
    """still_due, for an edit by a reload or a clock set: it had no test of its own, and the schedules tests, on
    the wall clock, let a recompute keep a due time whose calendar time was still to come, or one already fired."""
    waiting = ScheduleState("s", last_run=T0 + 5, last_due=T0, next_run=T0 + 3600 + 40)  # 11:00:40, for 11:00
    assert still_due(DEFINITION, HOURLY, waiting, T0 + 3600 + 1) == T0 + 3600 + 40  # 11:00:01: its jitter runs
    assert still_due(DEFINITION, HOURLY, waiting, T0 + 3600 + 90) == T0 + 3600 + 40  # came during a long reload
    assert still_due(DEFINITION, HOURLY, waiting, T0 + 3000) is None  # 11:00 still to come: drawn again
    fired = dataclasses.replace(waiting, last_due=T0 + 3600 + 40)
    assert still_due(DEFINITION, HOURLY, fired, T0 + 3600 + 41) is None  # fired already (the clock set back since)
    assert still_due(dataclasses.replace(DEFINITION, jitter=10.0), HOURLY, waiting, T0 + 3601) is None  # no longer
    half_past = Calendar.parse("30 * * * *")
    assert still_due(DEFINITION, half_past, waiting, T0 + 3601) is None  # another calendar
    assert still_due(DEFINITION, half_past, waiting, T0 + 5401) is None  # whose 11:30 has come, but is not 11:00
    assert still_due(DEFINITION, None, waiting, T0 + 3601) is None  # a calendar that could not be read
    assert still_due(DEFINITION, HOURLY, dataclasses.replace(waiting, suspended=True), T0 + 3601) is None
    assert still_due(DEFINITION, HOURLY, ScheduleState("s"), T0 + 3601) is None  # never armed


def test_catch_up_after_the_calendar_changed_while_jobd_was_down() -> None:
    """The time jobd waited for belongs to the calendar it ran with: changed meanwhile (every minute became
    @yearly), that old time was taken as missed and the schedule ran at once. Now the new calendar decides, from
    the last start, as systemd's Persistent= does for a changed OnCalendar=."""
    on = dataclasses.replace(DEFINITION, catch_up=True, jitter=0.0)
    every_minute = ScheduleState("s", last_run=T0, next_run=T0 + 60)  # waited for 10:01 when it stopped
    assert catch_up_due(on, Calendar.parse("* * * * *"), every_minute, T0 + 600) is True  # unchanged: missed
    assert catch_up_due(on, Calendar.parse("@yearly"), every_minute, T0 + 600) is False  # nothing of it passed
    assert catch_up_due(on, HOURLY, every_minute, T0 + 600) is False  # 11:00, the next after 10:00, is to come
    assert catch_up_due(on, HOURLY, every_minute, T0 + 3600) is True  # 11:00 passed while jobd was down
    never_ran = ScheduleState("s", next_run=T0 + 60)
    assert catch_up_due(on, HOURLY, never_ran, T0 + 86400) is False  # a new calendar never armed: nothing missed
    # Within the jitter of a due time, the time waited for is still this calendar's.
    jittered = ScheduleState("s", last_run=T0 - 3600, next_run=T0 + 59.5)
    assert catch_up_due(dataclasses.replace(on, jitter=60.0), HOURLY, jittered, T0 + 120) is True


def test_catch_up_counts_only_the_due_time_jobd_waited_for_when_it_stopped() -> None:
    """Due times that passed while jobd ran without firing them were not missed while it was down: skipped while a
    run went (overlap "skip": the next time is computed at the run's end), or while the schedule was disabled or
    suspended (computed at the enable). A catch-up ran for them at the next start-up all the same."""
    on = dataclasses.replace(DEFINITION, catch_up=True)
    # Started at 10:00:05; 11:00 and 12:00 passed while it ran (or while it was disabled); 13:00 is next.
    after_skips = ScheduleState("s", last_run=T0 + 5, next_run=T0 + 3 * 3600)
    assert catch_up_due(on, HOURLY, after_skips, T0 + 2 * 3600 + 60) is False  # restarted at 12:01
    assert catch_up_due(on, HOURLY, after_skips, T0 + 3 * 3600) is True  # down across 13:00
    # A run started for the due time the state waited for, unrecorded (a crash): the last start decides.
    adopted = ScheduleState("s", last_run=T0 + 3600, next_run=T0 + 3600)
    assert catch_up_due(on, HOURLY, adopted, T0 + 3600 + 60) is False
    assert catch_up_due(on, HOURLY, adopted, T0 + 2 * 3600) is True
    # The run going at the stop ended while jobd was down: no next time was computed, the last start decides.
    ended = ScheduleState("s", last_run=T0 + 5, last_run_id=1, last_result="succeeded", after_run=True)
    assert catch_up_due(on, HOURLY, ended, T0 + 3600) is True


def test_catch_up_counts_nothing_for_a_schedule_that_was_disabled_when_jobd_stopped() -> None:
    """A schedule disabled (or suspended) when jobd stopped and enabled again at the start, by its file edited
    while jobd was down, was caught up for the times that passed since its last run: those passed while it was
    disabled, and a live enable (a reload) counts from now. Both wait for the next time now."""
    on = dataclasses.replace(DEFINITION, catch_up=True)
    disabled_at_stop = ScheduleState("s", last_run=T0 + 5, last_run_id=1, last_result="succeeded")
    assert catch_up_due(on, HOURLY, disabled_at_stop, T0 + 86400) is False
    # A row saved before jobd told the two apart (after_run not known) is decided as it was: from the last run.
    assert catch_up_due(on, HOURLY, dataclasses.replace(disabled_at_stop, after_run=None), T0 + 86400) is True

"""Schedule calendars and the pure decisions built on them: when a `[schedule.NAME]` is next due, and whether a
due time was missed while jobd was down.

No asyncio and no clock reads: every function takes the time it reasons about (`now`, `after`) as Unix seconds, so
the runtime (`jobd.engine.scheduler`) decides when to ask and tests can ask about any date. Calendar arithmetic,
time zones and DST come from croniter and zoneinfo; this module only translates syntaxes and states the rules.

Accepted calendar syntaxes (`Calendar.parse`):

- cron, 5 fields `min hour day month wday`, with everything croniter accepts in a field (lists, ranges, steps,
  month and day names). As in Vixie cron and cronie, when day and weekday are both restricted (neither field starts
  with `*`, as `*/2` does) a day matching EITHER counts; otherwise a day must match both. jobd makes that union
  itself, from two croniter expressions (`Calendar.sides`): croniter's own keeps `L5`, `#` and `W` on both of its
  sides, so that `0 0 1 2 5#5` was the 1st of February AND a fifth Friday, and refused as never due.
- cron with 6 fields, SECONDS FIRST (`sec min hour day month wday`), as Quartz and systemd users expect; croniter's
  own default puts seconds last, hence `second_at_beginning`.
- `@yearly @annually @monthly @weekly @daily @midnight @hourly`, spelled out as their usual 5-field meaning.
- evQueue's `sec;min;hour;day;month;wday`: comma lists of integers (a sign, `+5`, and a comma after the last value
  accepted, as evQueue's parser does), an empty level means every value, day 0–30 is the 1st–31st, month 0–11 is
  January–December, wday 0–6 with Sunday 0. Unlike cron, day and weekday are ANDed (evQueue's rule), which croniter
  does with `day_or=False`. Errors start with evQueue's exact messages, then name the value and the level.

DST, for a calendar evaluated in a zone that has it (the rules are croniter's, plus one filter of ours):

- a wall-clock time skipped by a spring-forward jump fires at the jump (02:30 on the day Paris goes from 02:00 to
  03:00 fires at 03:00, and so does 02:30:30: croniter's 03:00:30 is moved back to the jump), as Vixie cron does:
  a daily job is not lost; but a "wildcard" calendar (see below) goes on
  at its times of the new clock (`0 */2 * * *`: 00:00, then 04:00), as `30 * * * *` does (01:30, then 03:30), not
  at the jump and again an hour later;
- a wall-clock time repeated by a fall-back fires at both occurrences only for a wildcard calendar, so an hourly
  or every-second schedule keeps its rhythm through the repeated hour; a fixed-time calendar fires once, at the
  first occurrence, so a daily 02:30 job runs once.
  This is Vixie cron's rule for "wildcard" versus "fixed-time" jobs: a wildcard job's minute or hour field starts
  with `*` (`*`, `*/15`); here also its seconds field, and in evQueue's format an empty second, minute or hour
  level.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import re
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

from croniter import CroniterBadCronError, CroniterBadDateError, CroniterError, croniter

from jobd.errors import did_you_mean
from jobd.localzone import local_zone
from jobd.model import ScheduleDef, ScheduleState

# evQueue's messages, word for word: clients and the UI show them as they are.
EMPTY = "Empty schedule"
NON_NUMERIC = "Non numeric data in schedule offset"
OUT_OF_RANGE = "Out of range schedule offset"
GARBAGE = "Garbage at end of schedule"
IMPOSSIBLE = "Schedule constraints are impossible to satisfy"

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

# cron's fields, seconds first when there are 6, and the values each one takes.
_CRON_FIELDS = ("SEC", "MIN", "HOUR", "DAY", "MONTH", "WDAY")
_CRON_VALUES = {
    "SEC": "0-59",
    "MIN": "0-59",
    "HOUR": "0-23",
    "DAY": "1-31 (or L, the last day; 15W, the weekday nearest the 15th)",
    "MONTH": "1-12 or jan-dec",
    "WDAY": "0-7 (0 and 7 are Sunday) or sun-sat (or 5#2, the 2nd Friday of the month)",
}
# evQueue's levels: (size, offset added to turn its 0-based value into cron's value).
_EVQUEUE_LEVELS = ((60, 0), (60, 0), (24, 0), (31, 1), (12, 1), (7, 0))
_DAY, _MONTH, _HOUR = 3, 4, 2
_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # February may have a 29th: leap years
_MONTH_NAMES = (
    *("January", "February", "March", "April", "May", "June"),
    *("July", "August", "September", "October", "November", "December"),
)
# evQueue reads a value with strtol(): a sign may lead it (`+5` is 5; `-0` is 0, `-1` out of range).
_INTEGER = re.compile(r"[+-]?[0-9]+")
# The blanks strtol() skips before a value (C's isspace()): jobd ignores them around values and separators.
_BLANKS = " \t\n\v\f\r"
_EVQUEUE_FORMAT = "SEC;MIN;HOUR;DAY;MONTH;WDAY"
_LEVEL_NAMES = _EVQUEUE_FORMAT.split(";")
_ORDINALS = ("1st", "2nd", "3rd", "4th", "5th", "6th")
_MEANINGS = {3: ", for the 1st to the 31st", 4: ", for January to December", 5: ", Sunday 0"}
# croniter's Jenkins-style values in a cron field: R (random) and H (hashed), with an optional (range) and /step.
_DRAWN = re.compile(r"[HhRr](\([0-9]+-[0-9]+\))?(/[0-9]+)?")

# A day-and-weekday AND such as "29 February that is a Monday" can be decades away (28 years, 40 across a century
# that is not a leap year); croniter gives up after this many years without a match.
_MAX_YEARS_BETWEEN_MATCHES = 100
# The Gregorian calendar repeats its dates and weekdays every 400 years: an expression with no day in that many
# years has none ever. Searched once, when a calendar is read (a search that finds nothing takes tens of ms).
_GREGORIAN_CYCLE_YEARS = 400
_Due = TypeVar("_Due", float, dt.datetime)
# Skipping the second pass of a repeated hour never needs more steps than the seconds of an hour, with room.
_MAX_STEPS = 10_000

# Setting the clock back by up to this fires no due time a second time (see `next_run`); Vixie cron's bound.
MAX_STEP_BACK = 3 * 3600.0


class ImpossibleCalendar(ValueError):
    """A calendar that is well written but can never fire (`0 0 30 2 *`): what is allowed is not the point."""


@dataclass(frozen=True, slots=True)
class Calendar:
    """A parsed calendar: the croniter expression and the options that give it the meaning of its source text."""

    text: str  # as written in the config
    expression: str  # what croniter is given
    seconds_first: bool  # 6 fields, seconds in the first one
    day_or: bool  # a day matching day OR weekday counts (cron, both restricted); False: it must match both
    wildcard: bool  # second, minute or hour field starts with `*` (Vixie cron's wildcard job): DST does not shift it
    # The croniter expressions, each read with day AND weekday, whose due times together are the calendar's: the
    # expression itself, or with day_or one with WDAY `*` and one with DAY `*` (a side that is never due is left
    # out by parse: `0 0 30 2 5#5` is the fifth Friday of February, in the years it has one).
    sides: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Calendar:
        """Parse any accepted syntax (see the module docstring); ValueError says what is wrong.

        A `;` anywhere makes it evQueue's format, so its messages apply; anything else is cron or a macro.
        Impossible cron expressions (`0 0 30 2 *`) are refused here too, with evQueue's message and why
        (ImpossibleCalendar), by asking each side for one due time in 400 years: a schedule that can never fire is a
        configuration mistake.
        """
        stripped = text.strip()
        if not stripped:
            raise ValueError(EMPTY)
        calendar = _parse_evqueue(text) if ";" in stripped else _parse_cron(stripped)
        due_sides = tuple(side for side in calendar.sides if _ever_due(side, calendar.seconds_first))
        if not due_sides:
            raise ImpossibleCalendar(_why_never(calendar))
        return dataclasses.replace(calendar, sides=due_sides)

    def evqueue_text(self) -> str | None:
        """The calendar in evQueue's `sec;min;hour;day;month;wday` (what evQueue's clients show and parse), or None
        when that format cannot say it: cron's `L`, `W` and `#`, or a day and a weekday that cron ORs (evQueue ANDs
        them). An evQueue calendar is given back as written."""
        if ";" in self.text:  # evQueue's format (see parse)
            return self.text
        parsed = croniter(self.expression, 0.0, second_at_beginning=self.seconds_first)
        expanded: list[list[object]] = [list(field) for field in parsed.expanded]  # ints, or "*", "l"…
        minutes, hours, days, months, weekdays = expanded[:5]
        seconds = expanded[5] if self.seconds_first else [0]
        if (self.day_or and days != ["*"] and weekdays != ["*"]) or parsed.nth_weekday_of_month:  # `5#2`: 2nd Friday
            return None
        if getattr(parsed, "nearest_weekday", None):  # `15W`: the weekday nearest the 15th (croniter 2.0.2 on)
            return None
        levels = []
        for values, (_, shift) in zip((seconds, minutes, hours, days, months, weekdays), _EVQUEUE_LEVELS, strict=True):
            numbers = [value for value in values if isinstance(value, int)]
            if values == ["*"]:
                levels.append("")
            elif len(numbers) == len(values):
                levels.append(",".join(str(number - shift) for number in sorted(set(numbers))))
            else:  # `L` (the last day of the month) and the like
                return None
        return ";".join(levels)

    def next_after(self, after: float, timezone: str | None) -> float:
        """The first matching second strictly after `after` (Unix time), wall-clock times read in `timezone`.

        `timezone` is an IANA name; None is the machine's local zone (`local_zone()`). A fractional `after` counts
        from its whole second: the answer is always a whole second, and always > `after`.
        """
        zone = local_zone() if timezone is None else zoneinfo.ZoneInfo(timezone)
        start = dt.datetime.fromtimestamp(math.floor(after), zone)
        times = self._due_times(start, float)
        for _ in range(_MAX_STEPS):
            due = next(times, None)
            if due is None:
                break  # pragma: no cover (parse keeps only sides that are due in every 400 years)
            if due <= after:  # never go back in time, whatever a library does around a transition
                continue
            wall = dt.datetime.fromtimestamp(due, zone)
            if not self.wildcard and wall.fold == 1:
                continue  # second pass of a repeated hour: a fixed-time calendar already fired in the first
            if not self._names(wall):  # croniter's stand-in at a spring-forward jump for a time that did not exist
                if self.wildcard:
                    continue  # it goes on at its times of the new clock (see _names)
                due = _jump_before(due, zone)
                if due <= after:
                    continue  # that jump has passed: the skipped time was due at it
            return due
        raise CroniterBadDateError(f"no due time found after {_MAX_STEPS} steps")  # pragma: no cover

    def _names(self, wall: dt.datetime) -> bool:
        """Whether the calendar names this wall-clock time. Not so for the time croniter gives at a spring-forward
        jump for one the jump skipped (`0 */2 * * *` at 03:00 for 02:00): a wildcard calendar goes on at its times
        of the new clock, as it does for `30 * * * *` (01:30, then 03:30), instead of running at the jump and again
        an hour later."""
        naive = wall.replace(tzinfo=None)  # no zone, no jumps: the calendar's own times (croniter.match errs on 29 Feb)
        return next(self._due_times(naive - dt.timedelta(seconds=1), dt.datetime), None) == naive

    def _due_times(self, start: dt.datetime, kind: type[_Due]) -> Iterator[_Due]:
        """The calendar's times after `start`, in order, each once: those of its sides merged (cron's day OR
        weekday). A side croniter finds no time for in its search (`_MAX_YEARS_BETWEEN_MATCHES`) is dropped."""
        sides = [
            croniter(
                side,
                start,
                day_or=False,
                second_at_beginning=self.seconds_first,
                max_years_between_matches=_MAX_YEARS_BETWEEN_MATCHES,
            )
            for side in self.sides
        ]
        upcoming: dict[int, _Due] = {}

        def advance(index: int) -> None:
            try:
                upcoming[index] = sides[index].get_next(kind)
            except CroniterBadDateError:  # pragma: no cover (parse keeps only sides due in every 400 years)
                upcoming.pop(index, None)

        for index in range(len(sides)):
            advance(index)
        while upcoming:
            due = min(upcoming.values())
            yield due
            for index in [index for index, value in upcoming.items() if value == due]:
                advance(index)


def _jump_before(stand_in: float, zone: dt.tzinfo) -> float:
    """The moment of the spring-forward jump that croniter's `stand_in` (a whole second) stands for.

    croniter moves a wall-clock time that a jump skipped on by whole minutes until it exists, so the stand-in of
    a time with seconds (`30 30 2 * * *`, 02:30:30 in Paris) is that many seconds after the jump (03:00:30), and
    of any time in a gap that does not end at a whole minute of the new clock, up to a minute after it. A
    fixed-time calendar fires at the jump itself, as its documentation says: the jump is the first second, in
    the minute before the stand-in, whose UTC offset is the stand-in's."""

    def offset(moment: int) -> dt.timedelta | None:
        return dt.datetime.fromtimestamp(moment, zone).utcoffset()

    new_offset = offset(int(stand_in))
    before, jump = int(stand_in) - 60, int(stand_in)  # offset(before) is the old one, offset(jump) the new one
    if offset(before) == new_offset:
        return stand_in  # no jump in that minute: nothing to move it to
    while jump - before > 1:
        middle = (before + jump) // 2
        if offset(middle) == new_offset:
            jump = middle
        else:
            before = middle
    return float(jump)


def _parse_cron(stripped: str) -> Calendar:
    if stripped.startswith("@"):
        expression = MACROS.get(stripped.lower())
        if expression is None:
            # What is allowed is said once, by whoever reports this (config.CALENDAR_RULE lists the macros).
            unknown = f"unknown macro {stripped}{did_you_mean(stripped.lower(), MACROS)}"
            if stripped.lower() == "@reboot":
                unknown += " (schedules run at calendar times; jobd has no start-up macro)"
            raise ValueError(unknown)
    else:
        expression = " ".join(stripped.split())
    fields = expression.split(" ")
    _check_not_a_crontab_line(fields)
    _check_no_space_inside(fields)
    if len(fields) not in (5, 6):
        raise ValueError(
            f"expected 5 cron fields (min hour day month wday) or 6 with seconds first, found {len(fields)}"
            + _systemd_hint(stripped)
        )
    seconds_first = len(fields) == 6
    for item in (item for field in fields for item in field.split(",")):
        if _DRAWN.fullmatch(item):
            # croniter draws R's value afresh each time it reads the expression, and jobd reads it at every next
            # time: `R * * * *` would fire at a new minute after each firing, several times an hour.
            raise ValueError(
                f"{item!r}: croniter's random (R) and hashed (H) values are not supported; give the values themselves"
            )
    _check_no_step_from_sunday_seven(fields[-1])
    names = _CRON_FIELDS[-len(fields) :]
    expression = " ".join(_without_same_ends(field) for field in fields)
    try:
        croniter(expression, 0.0, second_at_beginning=seconds_first)
    except (CroniterBadCronError, CroniterError) as error:
        raise ValueError(_bad_field(fields, names, seconds_first) or f"invalid cron expression: {error}") from None
    # Vixie cron's wildcard job: a minute or hour field that starts with `*` (`*`, `*/15`) steps through the clock's
    # times as they come, the repeated hour included; a list of minutes and hours names times of day, each run
    # once. A seconds field counts as the minute does.
    wildcard = any(field.startswith("*") for field in fields[: 3 if seconds_first else 2])
    # Vixie cron's and cronie's rule for day and weekday: a day matching either counts only when neither field
    # starts with `*`; `*/2` is a star there, so `0 0 */2 * 5` is an odd day that is a Friday, not both kinds.
    day_or = not (fields[-3].startswith("*") or fields[-1].startswith("*"))
    sides: tuple[str, ...] = (expression,)
    if day_or:  # the days of DAY, and the weekdays of WDAY: each side leaves the other field `*`
        *before, day, month, weekday = expression.split(" ")
        sides = (" ".join([*before, day, month, "*"]), " ".join([*before, "*", month, weekday]))
    return Calendar(stripped, expression, seconds_first, day_or=day_or, wildcard=wildcard, sides=sides)


def _ever_due(side: str, seconds_first: bool) -> bool:
    """Whether this croniter expression (one of a calendar's `sides`) has a due time in a whole Gregorian cycle, and
    so in every one: if not, it never has."""
    times = croniter(
        side, 0.0, day_or=False, second_at_beginning=seconds_first, max_years_between_matches=_GREGORIAN_CYCLE_YEARS
    )
    try:
        times.get_next(float)
    except CroniterBadDateError:
        return False
    return True


def _why_never(calendar: Calendar) -> str:
    """evQueue's message for a cron calendar that can never fire, then why, naming the fields: the days of DAY are in
    none of the months of MONTH (when a day must match DAY; with cron's OR, a weekday of WDAY would do), else no day
    of a whole Gregorian cycle matches the fields together (`15W` and a Sunday). With cron's OR, a calendar is never
    due only if neither side is; no such calendar can be written today (every month has a fifth of each weekday in
    some years), but the message stays true should one come."""
    fields = calendar.text.split()
    day_field, month_field, weekday_field = fields[-3:]
    expanded = croniter(calendar.expression, 0.0, second_at_beginning=calendar.seconds_first).expanded
    days: list[object] = list(expanded[2])  # ints, or "l" (`L`)
    months: list[object] = list(expanded[3])  # ints, or "*"
    chosen = list(range(1, 13)) if months == ["*"] else [value for value in months if isinstance(value, int)]
    numbers = [value for value in days if isinstance(value, int)]  # not `L` (`15W` is 15: then a month has it)
    in_a_month = any(number <= _DAYS_IN_MONTH[month - 1] for number in numbers for month in chosen)
    if not calendar.day_or and numbers == days and not in_a_month:
        return (
            f"{IMPOSSIBLE}: none of the months of MONTH {month_field!r} has one of the days of DAY {day_field!r}: "
            f"{_month_lengths(chosen)}"
        )
    matches = (
        f"MONTH {month_field!r} and either DAY {day_field!r} or WDAY {weekday_field!r}"
        if calendar.day_or
        else f"DAY {day_field!r}, MONTH {month_field!r} and WDAY {weekday_field!r}"
    )
    return (
        f"{IMPOSSIBLE}: no day matches {matches} (none in {_GREGORIAN_CYCLE_YEARS} years, after which the calendar's "
        "dates fall on the same weekdays again)"
    )


def _month_lengths(months: list[int]) -> str:
    """How many days each of these months (1-12) has: why a day is in none of them."""
    return ", ".join(
        f"{_MONTH_NAMES[month - 1]} has {_DAYS_IN_MONTH[month - 1]} days{' at most' if month == 2 else ''}"
        for month in sorted(set(months))
    )


def _ascii_number(text: str) -> bool:
    """Whether `text` is a number cron writes: ASCII digits. str.isdigit() says so of "¹" and "٣" too, which int()
    then refuses ("¹") or reads ("٣", 3) where no cron reads a number."""
    return text.isascii() and text.isdigit()


def _without_same_ends(field: str) -> str:
    """The field with each range whose ends are the same value (`3-3`, `mon-mon`, `5-5/2`) written as that value,
    as cron reads it: croniter reads such a range as the whole cycle (`0 3-3 * * *` every hour)."""
    items = []
    for item in field.split(","):
        span, _, _step = item.partition("/")
        low, dash, high = span.partition("-")
        numbers = _ascii_number(low) and _ascii_number(high) and int(low) == int(high)
        same = bool(dash and low) and (low.lower() == high.lower() or numbers)
        items.append(low if same else item)
    return ",".join(items)


def _check_no_step_from_sunday_seven(weekdays: str) -> None:
    """Refuses a step from 7 in the WDAY field (`7/2`). Elsewhere 7 is read as cronie reads it, Sunday, the field's
    last value (`5-7` is Friday to Sunday, `1-7/2` Monday, Wednesday, Friday, Sunday); but croniter reads `7/2` as
    `0/2`, stepping through the week from Sunday (Sunday, Tuesday, Thursday, Saturday), while from the last value a
    step reaches no other day. cronie refuses a step after a single value; so does jobd here, saying what to write
    (steps from 0 to 6, `1/2`, are croniter's: from that day to Saturday)."""
    for item in weekdays.split(","):
        start, slash, step = item.partition("/")
        if slash and _ascii_number(start) and int(start) == 7:
            raise ValueError(
                f"WDAY field {weekdays!r} is not valid: {item!r} is a step from 7, Sunday, the last value, which "
                f"reaches no other day; write 7 for Sundays, or */{step} to step through the week from Sunday"
            )


def _bad_field(fields: list[str], names: tuple[str, ...], seconds_first: bool) -> str | None:
    """What is wrong, naming the first field that croniter refuses on its own and what that field takes."""
    for index, (field, name) in enumerate(zip(fields, names, strict=True)):
        alone = ["*"] * len(fields)
        alone[index] = _without_same_ends(field)
        try:
            croniter(" ".join(alone), 0.0, second_at_beginning=seconds_first)
        except (CroniterBadCronError, CroniterError):
            return f"{name} field {field!r} is not valid: {name} takes {_CRON_VALUES[name]}, lists, ranges and steps"
    return None


def _systemd_hint(text: str) -> str:
    """A pointer for a calendar in systemd's OnCalendar= syntax, which jobd does not read."""
    if f"@{text.lower()}" in MACROS:
        return f"; did you mean @{text.lower()}?"
    if ":" in text or ".." in text or re.search(r"[0-9*]-[0-9*]+-[0-9*]", text):
        return "; systemd's OnCalendar= syntax is not read: `*-*-* 02:30:00` is cron's `30 2 * * *`"
    return ""


def _check_not_a_crontab_line(fields: list[str]) -> None:
    """A whole line of a crontab pasted as the calendar (`15 2 * * 1-5 www-data /usr/bin/report`: five time
    fields, then the user of /etc/crontab and /etc/cron.d, or the command) would be refused for its sixth field as a
    weekday, the seconds-first reading of 6 fields: say what the calendar is, and where the rest goes."""
    if len(fields) < 6:
        return
    try:
        croniter(" ".join(["*"] * 5 + [fields[5]]), 0.0, second_at_beginning=True)
        return  # a weekday: 6 fields with seconds first
    except (CroniterBadCronError, CroniterError):
        pass
    try:
        croniter(" ".join(_without_same_ends(field) for field in fields[:5]), 0.0)
    except (CroniterBadCronError, CroniterError):
        return  # not cron's time fields either: the usual message says which field is wrong
    raise ValueError(
        f"this looks like a crontab line, not a calendar: the calendar is its five time fields, "
        f"{' '.join(fields[:5])!r}; what follows them ({fields[5]!r}…) goes in the task: a user field "
        "(/etc/crontab, /etc/cron.d) is its `user`, the command its `command`"
    )


def _check_no_space_inside(fields: list[str]) -> None:
    """A space inside a list, range or step (`0, 30 * * * *`) makes two fields of one, which croniter refuses
    showing its own rotated copy of them (`[30 * * * * 0,]`), or which make a count of fields that is wrong: say
    which field, and why."""
    names = {5: "MIN HOUR DAY MONTH WDAY", 6: "SEC MIN HOUR DAY MONTH WDAY"}.get(len(fields), "").split()
    for number, field in enumerate(fields):
        after_a_space = number > 0 and field[0] in ",-/"
        before_a_space = number < len(fields) - 1 and field[-1] in ",-/"
        if after_a_space or before_a_space:
            name = f", {names[number]} of {len(fields)} fields" if names else ""
            edge = f"starts with {field[0]!r}" if after_a_space else f"ends with {field[-1]!r}"
            raise ValueError(
                f"invalid cron expression: field {number + 1}{name}, {field!r}, {edge}: a space ends a field, so a "
                "list, range or step is written without one (0,30 or 1-5 or */5, not 0, 30)"
            )


def _parse_evqueue(text: str) -> Calendar:
    """evQueue's format, checked as evQueue does, level by level, each refusal starting with evQueue's message and
    naming the value and the level.

    Fewer than 6 levels is accepted (the missing ones mean every value, as evQueue's parser reads them); after the
    6th, one `;` (evQueue skips it) and nothing more. Values are decimal integers, a sign allowed (`+5`): no `*`,
    ranges or steps (evQueue refuses them as non-numeric). evQueue skips one comma after each value, so a level may
    end with one (`0,30,` is `0,30`); an empty value anywhere else (`0,,30`, `,0`, a lone `,`) is non-numeric to it,
    and to jobd. Blanks around a value or a separator are ignored and a level of blanks is empty: evQueue's strtol()
    skips those before a value, and those after one (which evQueue refused) say nothing else.
    """
    levels = text.split(";")
    if len(levels) == len(_EVQUEUE_LEVELS) + 1 and not levels[-1].strip(_BLANKS):
        levels.pop()  # the one `;` evQueue skips after the last level
    if len(levels) > len(_EVQUEUE_LEVELS):
        rest = ";".join(levels[len(_EVQUEUE_LEVELS) :]).strip(_BLANKS)
        raise ValueError(f"{GARBAGE}: {rest!r} after the 6th level, WDAY (the format is {_EVQUEUE_FORMAT})")
    levels += [""] * (len(_EVQUEUE_LEVELS) - len(levels))
    values: list[list[int]] = []
    for number_of_level, (level, (size, _)) in enumerate(zip(levels, _EVQUEUE_LEVELS, strict=True)):
        where = f"{_LEVEL_NAMES[number_of_level]}, the {_ORDINALS[number_of_level]} level"
        numbers: list[int] = []
        if level.strip(_BLANKS):
            items = level.split(",")
            if len(items) > 1 and not items[-1].strip(_BLANKS):  # the one comma evQueue skips after the last value
                items.pop()
            for item in (item.strip(_BLANKS) for item in items):
                if not _INTEGER.fullmatch(item):
                    value = repr(item) if item else "an empty value"
                    raise ValueError(f"{NON_NUMERIC}: {value} in {where} (comma-separated integers)")
                number = int(item)
                if not 0 <= number < size:
                    meaning = _MEANINGS.get(number_of_level, "")
                    raise ValueError(f"{OUT_OF_RANGE}: {item} in {where} (0 to {size - 1}{meaning})")
                numbers.append(number)
        values.append(sorted(set(numbers)))
    # Only a day that no chosen month has can never happen (29th–31st); any date falls on every weekday in time.
    months = values[_MONTH] or list(range(12))
    days = values[_DAY] or [0]
    if not any(day < _DAYS_IN_MONTH[month] for day in days for month in months):
        raise ImpossibleCalendar(
            f"{IMPOSSIBLE}: none of the months of MONTH has one of the days of DAY (day 0 is the 1st): "
            f"{_month_lengths([month + 1 for month in months])}"
        )
    fields = [
        ",".join(str(number + shift) for number in numbers) if numbers else "*"
        for numbers, (_, shift) in zip(values, _EVQUEUE_LEVELS, strict=True)
    ]
    expression = " ".join(fields)
    return Calendar(
        text.strip(), expression, True, day_or=False, wildcard=not all(values[: _HOUR + 1]), sides=(expression,)
    )


def _active(definition: ScheduleDef, state: ScheduleState) -> bool:
    """The API's enable/disable (kept in the state) wins over the config's `enabled`; a suspension stops it."""
    enabled = definition.enabled if state.enabled is None else state.enabled
    return enabled and not state.suspended


def set_back(state: ScheduleState, now: float) -> float:
    """How many seconds `now` is before the due time the schedule last fired (0: not before it, or none fired).

    More than 0 only when the clock was set back since (an NTP step, settimeofday, a wrong clock corrected, also
    while jobd was stopped)."""
    return 0.0 if state.last_due is None else max(state.last_due - now, 0.0)


def next_run(
    definition: ScheduleDef, calendar: Calendar, state: ScheduleState, now: float, jitter_fraction: float
) -> float | None:
    """When the schedule is next due after `now`, or None when it is disabled or suspended.

    The due time is the calendar's first second strictly after `now` (evQueue computes it from "now" when the
    previous run ends, so missed slots are not replayed; `catch_up_due` covers downtime). `jitter_fraction` in
    [0, 1) comes from the caller's random source and delays it by that share of `definition.jitter`, like systemd's
    RandomizedDelaySec= drawn afresh each time; the calendar time itself stays the reference for the next one.

    A clock set back is the exception: a due time fires once. When `now` is before the due time the schedule last
    fired (`state.last_due`) by at most MAX_STEP_BACK, the next one is the first after that due time, not after
    `now`: a daily job that ran at 02:00 does not run again because an NTP step took the clock back a second, nor
    an hour; a calendar firing every second or minute is silent until the clock is back where it was. Further
    back, as Vixie cron does for a jump of more than 3 hours, the clock is taken as it is: the next time is the
    first after `now`, which may repeat times already fired (a machine that started with its clock years ahead
    would otherwise run nothing for years once corrected).
    """
    if not _active(definition, state):
        return None
    return calendar.next_after(_counted_from(state, now), definition.timezone) + jitter_fraction * definition.jitter


def _counted_from(state: ScheduleState, now: float) -> float:
    """The moment the next due time is the calendar's first after: now, or the due time last fired when the clock
    is behind it by at most MAX_STEP_BACK (see `next_run`)."""
    if 0 < set_back(state, now) <= MAX_STEP_BACK:
        assert state.last_due is not None
        return state.last_due
    return now


def catch_up_due(definition: ScheduleDef, calendar: Calendar, state: ScheduleState, now: float) -> bool:
    """At start-up: should the schedule run once now because a due time passed while jobd was down?

    systemd's Persistent=: only with `catch_up = true`, only when active, and at most one run whatever the number
    of missed times. Missed means: the due time jobd was waiting for when it stopped, `state.next_run`, is at or
    before `now`. Not a calendar time after `state.last_run`: due times that passed while jobd ran without firing
    them (skipped while a run went, with overlap "skip"; the schedule disabled or suspended meanwhile) were not
    missed while jobd was down, and the next time computed after them (at the run's end, at the enable) says so.
    The last start decides only when no later due time is known: none was computed because the schedule waited for
    the end of its run (overlap "skip", `state.after_run`; the run ended while jobd was down), or a run was started
    for it that the state did not record (a crash; see Scheduler._adopt_unsaved_run). A schedule that had no next
    time because it was disabled or suspended when jobd stopped missed nothing while jobd was down, as it would
    not have while jobd ran: enabled again (in the file while jobd was down, or at the start by a change of the
    file that overrides the API's disable) it waits for its next time, as a live enable does. A schedule with no
    next time and no run has never been armed (new in the config): nothing was missed, as systemd does not fire a
    timer that has no stamp yet.
    """
    if not definition.catch_up or not _active(definition, state):
        return False
    if state.next_run is not None and (state.last_run is None or state.last_run < state.next_run):
        if _is_due_time(calendar, definition, state.next_run):
            return state.next_run <= now
        # Not a time of this calendar: the calendar (or its zone) was changed while jobd was down, and the time
        # waited for was the old one's. Decided as systemd's Persistent= decides for a changed OnCalendar=, from
        # the last start; a schedule that never ran missed nothing.
        return state.last_run is not None and calendar.next_after(state.last_run, definition.timezone) <= now
    # after_run None: a row saved before jobd told the two apart; decided from the last start, as it was then.
    waited_for_the_run = state.next_run is not None or state.after_run is not False
    if state.last_run is not None and waited_for_the_run:
        return calendar.next_after(state.last_run, definition.timezone) <= now
    return False


def waited_for(definition: ScheduleDef, calendar: Calendar, state: ScheduleState, now: float) -> float | None:
    """At start-up: the due time jobd was waiting for when it stopped, if it is still to come, else None.

    Kept rather than computed again: with jitter, a due time delayed past the restart (the calendar's time passed,
    its delay not yet) is not the calendar's next after now, which is the one after it: that run was lost, with
    `catch_up` too (nothing was missed yet). Not kept when the calendar (or its jitter) changed while jobd was down
    and it is no longer one of its times, nor when it has fired already, nor when the calendar's time it stands for
    is still to come but is not the one `next_run` counts now: the clock was set back while jobd was down, and the
    saved time is as far ahead as the clock went back (days, for a machine that started with its clock ahead and
    was corrected), where `next_run` takes a clock more than MAX_STEP_BACK behind as it is."""
    due = state.next_run
    if due is None or due <= now or not _active(definition, state):
        return None
    if state.last_due is not None and state.last_due >= due:
        return None
    standing_for = calendar.next_after(due - definition.jitter - 1, definition.timezone)
    if standing_for > due:
        return None  # not a time of this calendar, delayed by at most its jitter
    if standing_for <= now:
        return due  # its jitter delay runs
    return due if standing_for == calendar.next_after(_counted_from(state, now), definition.timezone) else None


def still_due(definition: ScheduleDef, calendar: Calendar | None, state: ScheduleState, now: float) -> float | None:
    """When the next time is computed again (the schedule edited by a reload, the clock set): the due time it
    waited for, if the calendar's time it stands for has come (it is due, or its jitter delay runs), it has not
    fired, and the schedule, as it is now, still has it (a time of its calendar, delayed by at most its jitter);
    None otherwise.

    Computed after now alone, the next time would pass over it: a nightly job edited, or the clock stepped by NTP,
    in its jitter window would skip that night, and a due time that came while the event loop read the files at a
    reload (seconds, for a large configuration) would be lost. A due time whose calendar time is still to come is
    drawn again, as an edit asks. The caller takes the earlier of this and the next time after now: a calendar
    made denser still comes sooner."""
    due = state.next_run
    if calendar is None or due is None or not _active(definition, state):
        return None
    if state.last_due is not None and state.last_due >= due:
        return None
    standing_for = calendar.next_after(due - definition.jitter - 1, definition.timezone)
    return due if standing_for <= min(due, now) else None


def _is_due_time(calendar: Calendar, definition: ScheduleDef, moment: float) -> bool:
    """Whether `moment` is one of the calendar's due times, delayed by at most the schedule's jitter."""
    return calendar.next_after(moment - definition.jitter - 1, definition.timezone) <= moment


__all__ = [
    "EMPTY",
    "GARBAGE",
    "IMPOSSIBLE",
    "MACROS",
    "MAX_STEP_BACK",
    "NON_NUMERIC",
    "OUT_OF_RANGE",
    "Calendar",
    "ImpossibleCalendar",
    "catch_up_due",
    "next_run",
    "set_back",
    "still_due",
    "waited_for",
]

"""The machine's time zone, with its DST rules: the zone of schedules without a `timezone` (jobd) and of the local
times jobctl shows. A fixed UTC offset such as `datetime.now().astimezone().tzinfo` would not do: it is the offset
of now, wrong for a time on the other side of a DST change."""

from __future__ import annotations

import datetime as dt
import io
import os
import time
import zoneinfo


class LocalZone:
    """The machine's zone with its DST rules: $TZ if it names a zone (an IANA name, or a zone file's absolute path as
    glibc reads it), else /etc/localtime, else UTC. A fixed offset such as `datetime.now().astimezone().tzinfo`
    would not do: it ignores the next DST change.

    Read at its first use, then kept; refresh() reads again what it is read from, and drops the zone if that
    changed (`timedatectl set-timezone` points /etc/localtime elsewhere), for a reload to recompute the next times.
    """

    def __init__(self) -> None:
        self._source: tuple[str, bytes | None] | None = None
        self._zone: dt.tzinfo | None = None

    def __call__(self) -> dt.tzinfo:
        if self._zone is None:
            self._source = _local_zone_source()
            self._zone = _zone_of(*self._source)
        return self._zone

    def refresh(self) -> bool:
        """Whether the zone changed since it was read (it is then read again at its next use).

        libc's zone is read again too: glibc's localtime_r, behind jobd's log lines and evQueue's local times
        (`scheduled_at`), reads /etc/localtime once, and would show the old zone's times beside the new one's."""
        time.tzset()
        if self._zone is None or _local_zone_source() == self._source:
            return False
        self._zone = None
        return True


def _local_zone_source() -> tuple[str, bytes | None]:
    """$TZ (without glibc's leading `:`) and the content of the zone file it reads (None if it cannot be read):
    the file $TZ gives by its absolute path (`TZ=:/usr/share/zoneinfo/Asia/Kolkata`, as tzset(3) reads it), else
    /etc/localtime."""
    name = os.environ.get("TZ", "").removeprefix(":")
    for path in (name, "/etc/localtime") if name.startswith("/") else ("/etc/localtime",):
        try:
            with open(path, "rb") as file:
                return name, file.read(1 << 20)
        except OSError:
            continue
    return name, None


def _zone_of(name: str, zone_file: bytes | None) -> dt.tzinfo:
    if name and not name.startswith("/"):
        try:
            return zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):  # OSError: TZ=Europe, a directory of zones
            pass
    if zone_file is not None:
        try:
            return zoneinfo.ZoneInfo.from_file(io.BytesIO(zone_file), key="localtime")
        except ValueError:
            pass
    return dt.UTC


local_zone = LocalZone()


__all__ = ["LocalZone", "local_zone"]

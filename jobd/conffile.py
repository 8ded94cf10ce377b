"""Reading a file of the configuration (a TOML file, a workflow) safely, whatever an administrator put there.

The reads happen on the event loop, so a name that leads to a FIFO would stop the whole daemon in open() until
something writes to it, and one that leads to /dev/zero would fill its memory. Only regular files are read, with
O_NONBLOCK (a FIFO swapped in between the check and the open cannot block it either) and up to MAX_BYTES.
"""

from __future__ import annotations

import os
import stat

from jobd.errors import ConfigError, OutOfResources, shortage
from jobd.model import printable

MAX_BYTES = 16 * 1024 * 1024  # far above any real configuration or workflow; below what would hurt jobd's memory
READ_CHUNK = 64 * 1024  # the least a read asks for (read() below)

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def shown(path: object) -> str:
    """A file's path, or a value read from it, as an error message names it, on one line and inert on a terminal:
    control characters (a newline would start what reads as another error, in the log and in STATUS=; an escape
    sequence would drive the terminal) and the characters that reorder text are written as escapes, bytes that are
    not UTF-8 as `\\xNN`."""
    return "".join(_shown_char(char) for char in printable(str(path)))


def _shown_char(char: str) -> str:
    code = ord(char)
    if code < 0x20 or 0x7F <= code < 0xA0:
        return f"\\x{code:02x}"
    if 0x202A <= code <= 0x202E or 0x2066 <= code <= 0x2069 or code in (0x200E, 0x200F, 0x061C):
        return f"\\u{code:04x}"
    return char


def read(path: str) -> bytes:
    """The bytes of the regular file at `path` (symlinks followed); ConfigError naming the file and the reason
    for anything else: missing, unreadable, not a regular file, larger than MAX_BYTES."""
    try:
        # Checked before the open: opening a device can have effects of its own (a tape rewinds).
        _check(path, os.stat(path))
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as error:
        raise _unreadable(path, error) from None
    try:
        info = os.fstat(fd)
        _check(path, info)
        chunks: list[bytes] = []
        size = 0
        # os.read() allocates all it is asked for, then shrinks it to what came: each read asks for what fstat() said
        # is left, and one byte more to find the end (READ_CHUNK at least, for a file growing while read), never for
        # MAX_BYTES. 16 MiB asked for at every read of a reload made glibc take such buffers from the heap once one
        # was freed, and each, cut down to the file's few hundred bytes, left the heap a little more fragmented:
        # about 1.5 KiB of jobd's memory per reload of a changed file, never given back.
        while chunk := os.read(fd, min(max(info.st_size + 1 - size, READ_CHUNK), MAX_BYTES + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_BYTES:
                raise _too_large(path)
        return b"".join(chunks)
    except OSError as error:
        raise _unreadable(path, error) from None
    finally:
        os.close(fd)


def _check(path: str, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = _KINDS.get(stat.S_IFMT(info.st_mode), "something else")
        raise ConfigError(
            f"{shown(path)}: is {kind}, not a regular file; jobd reads only regular files here (a symlink to /dev/null "
            "masks a name)",
            file=path,
            line=None,
            key=None,
        )
    if info.st_size > MAX_BYTES:
        raise _too_large(path)


def _too_large(path: str) -> ConfigError:
    return ConfigError(
        f"{shown(path)}: larger than {MAX_BYTES // (1024 * 1024)} MiB, the most jobd reads of a configuration file",
        file=path,
        line=None,
        key=None,
    )


def _unreadable(path: str, error: OSError) -> ConfigError | OutOfResources:
    """Why the file cannot be read: its own trouble (ConfigError), or jobd's shortage of descriptors or memory
    (OutOfResources: the file may well be sound, and nothing about it should be reported as invalid)."""
    short = shortage(f"{shown(path)}: cannot read", error, "the configuration is not read now")
    return short or ConfigError(f"{shown(path)}: cannot read: {error.strerror}", file=path, line=None, key=None)

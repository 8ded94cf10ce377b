"""What a job wrote, made safe to show on a terminal: `jobctl log` (and `jobctl instance --xml`, which holds task
outputs) on a terminal passes a job's bytes through here.

A job's output is whatever its program (or whoever fed it data: a web client's upload, a remote server's answer)
wrote. Written raw to an administrator's terminal, its escape sequences would drive that terminal: clear the screen,
move the cursor back over lines already shown, rename the window, set the clipboard (OSC 52), answer queries as if
typed. Here every such character is shown as an escape (`\\x1b`, `\\r`, `\\x9b`, `\\u202e`) instead, and a byte
that is not text in the terminal's encoding (UTF-8 on most systems) as `\\xNN`; text, tabs and line ends (`\\n`,
`\\r\\n`) are left as they are.
"""

from __future__ import annotations

import codecs
import re

# Escaped: the C0 controls but tab and line feed, DEL, the C1 controls (xterm takes U+009B as CSI, the start of an
# escape sequence), a carriage return not ending a line (`\r\n` is a line end: output from Windows tools, network
# protocols; a lone one returns to the line's start, where the next text hides what was there), and the Unicode
# bidirectional embeddings, overrides and isolates, which reorder how the rest of a line reads on a terminal that
# follows them (the "Trojan Source" characters).
_UNSAFE = re.compile("\r(?!\n)|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape(found: re.Match[str]) -> str:
    return found[0].encode("unicode_escape").decode("ascii")


def terminal_text(text: str) -> str:
    """`text` with every character that could drive a terminal shown escaped (see _UNSAFE)."""
    return _UNSAFE.sub(_escape, text)


class TerminalStream:
    """A stream of bytes, given in pieces as they come, shown as terminal-safe text in the terminal's `encoding`.

    The bytes are read in that encoding too: a job writes text in the encoding of its locale, which it has from jobd,
    most often the machine's, as the terminal's is. (On a UTF-8 terminal ISO-8859-1's é is shown as \\xe9.)

    A character whose bytes the pieces split (a chunk cut in the middle of `é`) is shown whole once its rest has come,
    and a carriage return at a piece's end waits for the next piece, which tells whether it ends a line."""

    def __init__(self, encoding: str) -> None:
        # "backslashreplace" shows each byte that is not text as \xNN, as the control characters are shown.
        self._decoder = codecs.getincrementaldecoder(encoding)(errors="backslashreplace")
        self._encoding = encoding
        self._carriage_return_held = False

    def feed(self, data: bytes, *, final: bool = False) -> bytes:
        """What of `data` (and of what came before it) can be shown now; `final`: the stream has ended."""
        text = self._decoder.decode(data, final)
        if self._carriage_return_held:
            text = "\r" + text
        self._carriage_return_held = not final and text.endswith("\r")
        if self._carriage_return_held:
            text = text[:-1]
        # A character the terminal's encoding lacks (an emoji on a Latin-1 terminal) is shown as \uNNNN, not lost.
        return terminal_text(text).encode(self._encoding, "backslashreplace")

    def end(self) -> bytes:
        """What was held back, now that the stream has ended: a split character's bytes, a carriage return."""
        return self.feed(b"", final=True)

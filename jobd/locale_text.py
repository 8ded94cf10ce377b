"""Text that jobd hands to the kernel (paths, a job's argv and environment) in the encoding of its locale: whether a
value can be, and what to say when it cannot.

Python encodes such text with os.fsencode, in the locale's encoding (UTF-8 in a UTF-8 locale and in the C locale,
which Python reads as UTF-8). In a locale of another encoding (fr_FR.ISO-8859-1) a character it lacks ("日本") cannot
be encoded, and the call raises UnicodeEncodeError, which reached the administrator as a traceback.
"""

from __future__ import annotations

import os
import sys


def encodable(text: str) -> bool:
    """Whether `text` can be passed to the kernel in the locale's encoding."""
    try:
        os.fsencode(text)
    except UnicodeEncodeError:
        return False
    return True


def why_not_encodable() -> str:
    """Why a value that is not `encodable` cannot be used, and what to do: to follow "holds characters that"."""
    return (
        f"the encoding of jobd's locale, {sys.getfilesystemencoding()} (from LC_ALL, LC_CTYPE or LANG), cannot pass "
        "to the system; run jobd in a UTF-8 locale (such as C.UTF-8)"
    )

"""Run `jobd.daemon` with every executed Python opcode counted by function, for bench/count.py.

    python bench/opcode_trace.py PYTHON -m jobd.daemon ARGS...   (what bench/count.py puts before jobd's command)

SIGUSR1 starts counting (sys.settrace with f_trace_opcodes, in every thread); SIGUSR2 stops it and writes the counts
to $JOBD_OPCODE_COUNTS: one line per function, `opcodes<TAB>calls<TAB>file:line:name`, most opcodes first. Frames
already running when counting starts (the event loop's) are not counted; everything they call is. Counting makes
the daemon tens of times slower, but what it counts does not depend on the machine's load.
"""

from __future__ import annotations

import collections
import os
import runpy
import signal
import sys
import threading
from types import CodeType, FrameType
from typing import Any

opcodes: collections.Counter[CodeType] = collections.Counter()
calls: collections.Counter[CodeType] = collections.Counter()


def _count_opcode(frame: FrameType, event: str, arg: Any) -> Any:
    if event == "opcode":
        opcodes[frame.f_code] += 1
    return _count_opcode


def _count_call(frame: FrameType, event: str, arg: Any) -> Any:
    if event != "call":
        return None
    frame.f_trace_opcodes = True
    calls[frame.f_code] += 1
    return _count_opcode


def _start(signum: int, frame: FrameType | None) -> None:
    sys.settrace(_count_call)
    threading.settrace(_count_call)


def _stop(signum: int, frame: FrameType | None) -> None:
    sys.settrace(None)
    threading.settrace(None)
    with open(os.environ["JOBD_OPCODE_COUNTS"], "w") as out:
        for code, count in opcodes.most_common():
            out.write(f"{count}\t{calls[code]}\t{code.co_filename}:{code.co_firstlineno}:{code.co_qualname}\n")


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _stop)
    if sys.argv[2:4] != ["-m", "jobd.daemon"]:
        sys.exit("usage: opcode_trace.py PYTHON -m jobd.daemon ARGS...")
    sys.argv = ["jobd.daemon", *sys.argv[4:]]
    runpy.run_module("jobd.daemon", run_name="__main__", alter_sys=True)

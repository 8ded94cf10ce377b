"""The mark beside the jobs' output (STATE_DIR/output/.job-ids): no job id above the number it holds was handed out.

A start must know the highest job whose output directory is left, to number new jobs past it when the database was
restored from an older copy (jobd.daemon). Listing output/ for it took 0.9 s with 400,000 jobs before READY=1, and
grew with the history. With the mark, a start looks only at the ids between the database's last job and the mark.

The mark is raised before an id past it is handed out, in steps of STEP ids: one small write per STEP jobs, and a
normal start then looks at fewer than STEP names. A start that finds no mark, or a mark below the database's last job
(written by a jobd without marks, which handed out ids past it), lists output/ as before and writes one.
"""

from __future__ import annotations

import contextlib
import logging
import os

log = logging.getLogger("jobd.job_id_mark")

MARK = ".job-ids"  # not a number: never taken for a job's directory
STEP = 1024


class JobIdMark:
    def __init__(self, output_dir: str) -> None:
        self.path = os.path.join(output_dir, MARK)
        self.limit: int | None = None  # as read or written; None: no mark (none found, or not one jobd wrote)
        self._broken = False  # a write failed: the mark is removed, and the next start lists output/

    def read(self) -> int | None:
        """The number the mark holds, or None if there is none or it is not one jobd wrote."""
        try:
            with open(self.path, "rb") as file:
                text = file.read(64).strip()
        except FileNotFoundError:
            return None
        except OSError as error:
            log.warning("cannot read %s (%s): output/ is listed instead", self.path, error.strerror or error)
            return None
        self.limit = int(text) if text.isdigit() else None
        return self.limit

    def cover(self, job_id: int) -> None:
        """Before `job_id` is handed out: raise the mark to it (and STEP beyond) unless it is covered already."""
        if not self._broken and (self.limit is None or job_id > self.limit):
            self.write(job_id + STEP)

    def write(self, limit: int) -> None:
        """Replace the mark, whole or not at all. A mark that cannot be written is removed, so that the next start
        lists output/ instead of trusting it; the job is not refused for it (its output may be written all the
        same)."""
        partial = self.path + ".partial"
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, b"%d\n" % limit)
                os.fsync(fd)  # before the rename: a crash leaves the old mark or the new one, never an empty file
            finally:
                os.close(fd)
            os.rename(partial, self.path)
        except OSError as error:
            log.warning(
                "the mark of the job ids handed out, %s, cannot be written (%s): it is removed, and the next start "
                "lists %s instead",
                self.path,
                error.strerror or error,
                os.path.dirname(self.path),
            )
            self._broken = True
            self.limit = None
            for path in (partial, self.path):
                with contextlib.suppress(OSError):
                    os.unlink(path)
            return
        self.limit = limit

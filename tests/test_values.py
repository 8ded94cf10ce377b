"""jobd/values.py: `@value` classes behave as the frozen dataclasses they replace, and `evolve` as
dataclasses.replace, for the classes jobd evolves on every job."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jobd.model import Attempt, Job, JobSpec, JobState, Outcome
from jobd.values import evolve

REPO = Path(__file__).resolve().parent.parent

SPEC = JobSpec(command=("/bin/true",), queue="default")
JOB = Job(id=7, spec=SPEC, state=JobState.QUEUED, created_at=10.0, run_at=12.5, progress=40)
ATTEMPT = Attempt(job_id=7, number=2, started_at=20.0, pid=4242, cut_streams=("stdout",))


@pytest.mark.parametrize(
    ("original", "changes"),
    [
        (JOB, {"state": JobState.RUNNING, "started_at": 21.0, "attempts": 1}),
        (JOB, {}),
        (ATTEMPT, {"outcome": Outcome.FAILED, "finished_at": 23.0, "exit_code": 3, "cut_streams": None}),
        (SPEC, {"priority": 5, "context": "x"}),
    ],
)
def test_evolve_makes_what_replace_makes(original: object, changes: dict[str, object]) -> None:
    before = dataclasses.astuple(original)
    made = evolve(original, **changes)
    assert made == dataclasses.replace(original, **changes)
    assert type(made) is type(original) and made is not original
    for field in dataclasses.fields(original):
        expected = changes.get(field.name, getattr(original, field.name))
        assert getattr(made, field.name) == expected, field.name
    assert dataclasses.astuple(original) == before  # the original is untouched


def test_evolve_refuses_a_name_that_is_not_a_field() -> None:
    with pytest.raises(TypeError, match="no_such_field"):
        evolve(JOB, no_such_field=1)
    with pytest.raises(TypeError):
        evolve(ATTEMPT, 5)  # fields by name only


def test_values_compare_and_hash_as_frozen_dataclasses_do() -> None:
    twin = Attempt(job_id=7, number=2, started_at=20.0, pid=4242, cut_streams=("stdout",))
    assert twin == ATTEMPT and hash(twin) == hash(ATTEMPT)
    assert evolve(twin, pid=1) != ATTEMPT
    assert len({ATTEMPT, twin, evolve(twin, pid=1)}) == 2
    assert not hasattr(ATTEMPT, "__dict__")  # slotted: no attribute can be added by mistake


def test_mypy_refuses_an_assignment_to_a_value_field(tmp_path: Path) -> None:
    """Immutability is the type checker's: `make test` runs mypy --strict on jobd/, which must refuse this."""
    source = tmp_path / "assigns.py"
    source.write_text(
        textwrap.dedent(
            """
            from jobd.model import Job
            from jobd.proc import ExitInfo

            def change(job: Job, info: ExitInfo) -> None:
                job.state = job.state
                info.exit_code = 1
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"), str(source)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"MYPYPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'Property "state" defined in "Job" is read-only' in result.stdout
    assert 'Property "exit_code" defined in "ExitInfo" is read-only' in result.stdout

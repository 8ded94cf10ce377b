"""Pure decisions about jobs: what follows an attempt. They take `now` and return what to do; no I/O."""

from __future__ import annotations

from jobd.model import Attempt, Job, JobState, Outcome
from jobd.values import value

RESOURCE_RETRY_DELAY = 1.0  # seconds before trying again a job that jobd itself could not start


@value
class NextStep:
    state: JobState
    run_at: float  # for DELAYED: when the job becomes ready again
    error: str | None = None


def after_attempt(
    job: Job,
    attempt: Attempt,
    now: float,
    *,
    tries: int,
    cancelled: bool,
    shutting_down: bool,
    jobd_short_of_resources: bool = False,
    retries_off: bool = False,
) -> NextStep:
    """Where a job goes once an attempt has ended. `tries` counts the attempts that ran their course, this one
    included: attempts stopped by jobd's shutdown, or never started for want of resources, do not use up the
    retry budget. `retries_off`: who runs the job wants no more tries (its workflow instance is being cancelled):
    a failed attempt ends it as if its policy allowed none."""
    outcome = attempt.outcome
    assert outcome is not None
    if jobd_short_of_resources and not cancelled:
        return NextStep(JobState.DELAYED, now + RESOURCE_RETRY_DELAY)
    if outcome is Outcome.SUCCEEDED:
        return NextStep(JobState.SUCCEEDED, job.run_at)
    if cancelled:
        return NextStep(JobState.CANCELLED, job.run_at, "cancelled while running")
    if shutting_down and outcome is Outcome.KILLED:
        # Stopped by jobd's own shutdown, not by a fault of the job: it runs again at the next start.
        return NextStep(JobState.QUEUED, now)
    if not retries_off and job.spec.retry.allows(tries, outcome, attempt.exit_code):
        delay = job.spec.retry.next_delay(tries)
        if delay > 0:
            return NextStep(JobState.DELAYED, now + delay)
        return NextStep(JobState.QUEUED, now)
    final = JobState.TIMED_OUT if outcome is Outcome.TIMED_OUT else JobState.FAILED
    return NextStep(final, job.run_at, attempt.error)


def outcome_of(exit_code: int | None, *, timed_out: bool, stopped: bool) -> Outcome:
    """Classify an ended process: jobd's own reasons for ending it come before what the process reported."""
    if timed_out:
        return Outcome.TIMED_OUT
    if stopped:
        return Outcome.KILLED
    if exit_code == 0:
        return Outcome.SUCCEEDED
    return Outcome.FAILED

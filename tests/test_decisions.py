"""The pure decisions of engine/decisions.py and the retry arithmetic of model.RetryPolicy, with `now` passed in."""

from __future__ import annotations

from jobd.engine.decisions import RESOURCE_RETRY_DELAY, after_attempt, outcome_of
from jobd.model import MAX_RETRY_DELAY, Attempt, Job, JobSpec, JobState, Outcome, RetryPolicy

NOW = 1_000_000.0


NO_RETRY = RetryPolicy()


def job(retry: RetryPolicy = NO_RETRY) -> Job:
    spec = JobSpec(command=("/bin/true",), queue="default", retry=retry)
    return Job(id=1, spec=spec, state=JobState.RUNNING, created_at=NOW - 10, run_at=NOW - 10, attempts=1)


def ended(outcome: Outcome, exit_code: int | None = None, number: int = 1) -> Attempt:
    return Attempt(job_id=1, number=number, started_at=NOW - 1, outcome=outcome, finished_at=NOW, exit_code=exit_code)


def step(j: Job, a: Attempt, tries: int = 1, **flags: bool) -> tuple[JobState, float]:
    options = {"cancelled": False, "shutting_down": False, **flags}
    result = after_attempt(j, a, NOW, tries=tries, **options)
    return result.state, result.run_at


def test_success_is_final() -> None:
    assert step(job(), ended(Outcome.SUCCEEDED, 0))[0] is JobState.SUCCEEDED


def test_failures_retry_with_exponential_back_off_until_the_budget_is_spent() -> None:
    retried = job(RetryPolicy(times=2, delay=10, backoff=3))
    assert step(retried, ended(Outcome.FAILED, 1), tries=1) == (JobState.DELAYED, NOW + 10)
    assert step(retried, ended(Outcome.FAILED, 1, number=2), tries=2) == (JobState.DELAYED, NOW + 30)
    assert step(retried, ended(Outcome.FAILED, 1, number=3), tries=3)[0] is JobState.FAILED


def test_a_zero_delay_retry_queues_at_once() -> None:
    assert step(job(RetryPolicy(times=1, delay=0)), ended(Outcome.FAILED, 1)) == (JobState.QUEUED, NOW)


def test_on_exit_codes_filters_failures_but_not_timeouts_or_lost_attempts() -> None:
    picky = job(RetryPolicy(times=1, delay=5, on_exit_codes=(75,)))
    assert step(picky, ended(Outcome.FAILED, 3))[0] is JobState.FAILED
    assert step(picky, ended(Outcome.FAILED, 75))[0] is JobState.DELAYED
    assert step(picky, ended(Outcome.TIMED_OUT))[0] is JobState.DELAYED
    assert step(picky, ended(Outcome.LOST))[0] is JobState.DELAYED


def test_final_states_follow_the_last_attempt() -> None:
    assert step(job(), ended(Outcome.TIMED_OUT))[0] is JobState.TIMED_OUT
    assert step(job(), ended(Outcome.LOST))[0] is JobState.FAILED
    assert step(job(RetryPolicy(times=5)), ended(Outcome.SPAWN_ERROR))[0] is JobState.FAILED


def test_cancel_wins_over_retry_and_shutdown_requeues() -> None:
    retried = job(RetryPolicy(times=5))
    assert step(retried, ended(Outcome.KILLED), cancelled=True)[0] is JobState.CANCELLED
    assert step(job(), ended(Outcome.KILLED), shutting_down=True) == (JobState.QUEUED, NOW)


def test_jobd_short_of_resources_delays_whatever_the_policy() -> None:
    state, run_at = step(job(), ended(Outcome.SPAWN_ERROR), jobd_short_of_resources=True)
    assert (state, run_at) == (JobState.DELAYED, NOW + RESOURCE_RETRY_DELAY)


def test_outcome_puts_jobds_reasons_first() -> None:
    assert outcome_of(0, timed_out=True, stopped=True) is Outcome.TIMED_OUT
    assert outcome_of(0, timed_out=False, stopped=True) is Outcome.KILLED
    assert outcome_of(0, timed_out=False, stopped=False) is Outcome.SUCCEEDED
    assert outcome_of(None, timed_out=False, stopped=False) is Outcome.FAILED


def test_back_off_never_overflows_past_a_year() -> None:
    steep = RetryPolicy(times=1000, delay=1, backoff=1e9)
    assert steep.next_delay(1000) == MAX_RETRY_DELAY
    assert RetryPolicy(delay=2, backoff=3).next_delay(3) == 18
    assert RetryPolicy(times=1000, delay=0, backoff=1e9).next_delay(1000) == 0  # 0 × anything, not a year

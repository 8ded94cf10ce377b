<?php

declare(strict_types=1);

namespace Jobd;

/**
 * What a progress display needs from an instance (instance.get): status, errors, a percentage and its tasks.
 *
 * The percentage is reckoned as `jobctl launch --wait` shows it: the mean, over the tasks the instance's document
 * holds so far (a loop may add tasks as it goes, so it can step back), of 100 for a task that is done (it has
 * ended, was skipped or aborted, or will never run because a job above it was skipped or aborted), its progression
 * while it runs, and 0 before. So an instance whose conditions left tasks out ends at 100%. toArray() is ready for
 * json_encode() in an AJAX endpoint.
 */
final class InstanceProgress
{
    /**
     * @param list<array{name: string, status: string|null, progress: int, retval: int|null, job_id: int|null}> $tasks
     */
    public function __construct(
        public readonly int $id,
        public readonly string $workflow,
        public readonly string $status,
        public readonly int $errors,
        public readonly int $percent,
        public readonly array $tasks,
    ) {
    }

    /** @param array<string, mixed> $instance an instance as instance.get returns it (format json) */
    public static function fromInstance(array $instance): self
    {
        $tasks = [];
        $weights = [];
        self::collect(is_array($instance['jobs'] ?? null) ? $instance['jobs'] : [], $tasks, $weights, false);
        $percent = 0;
        if ($tasks !== []) {
            $percent = intdiv(array_sum($weights), count($tasks));
        }
        return new self(
            (int) ($instance['id'] ?? 0),
            (string) ($instance['workflow'] ?? ''),
            (string) ($instance['status'] ?? ''),
            (int) ($instance['errors'] ?? 0),
            max(0, min(100, $percent)),
            $tasks,
        );
    }

    /**
     * The tasks of a tree of jobs: a job's tasks, then those of its subjobs, as deep as they nest; and what each
     * weighs in the percentage. A skipped or aborted job leaves its tasks, and those under it, without a status:
     * they will never run, so they are done.
     *
     * @param array<mixed> $jobs
     * @param list<array{name: string, status: string|null, progress: int, retval: int|null, job_id: int|null}> $tasks
     * @param list<int> $weights
     */
    private static function collect(array $jobs, array &$tasks, array &$weights, bool $gone): void
    {
        foreach ($jobs as $job) {
            if (!is_array($job)) {
                continue;
            }
            $jobGone = $gone || in_array($job['status'] ?? null, ['SKIPPED', 'ABORTED'], true);
            foreach (is_array($job['tasks'] ?? null) ? $job['tasks'] : [] as $task) {
                if (!is_array($task)) {
                    continue;
                }
                $status = $task['status'] ?? null;
                $progression = max(0, min(100, (int) ($task['progression'] ?? 0)));
                if ($jobGone || in_array($status, ['TERMINATED', 'ABORTED', 'SKIPPED'], true)) {
                    $weights[] = 100;
                } else {
                    $weights[] = $status === 'EXECUTING' ? $progression : 0;
                }
                $tasks[] = [
                    'name' => (string) ($task['name'] ?? ''),
                    'status' => isset($task['status']) ? (string) $task['status'] : null,
                    'progress' => (int) ($task['progression'] ?? 0),
                    'retval' => isset($task['retval']) && is_numeric($task['retval']) ? (int) $task['retval'] : null,
                    'job_id' => isset($task['job_id']) ? (int) $task['job_id'] : null,
                ];
            }
            self::collect(is_array($job['subjobs'] ?? null) ? $job['subjobs'] : [], $tasks, $weights, $jobGone);
        }
    }

    /** Whether the instance has ended (evQueue's TERMINATED), with or without errors. */
    public function isFinished(): bool
    {
        return $this->status === 'TERMINATED';
    }

    /** @return array{id: int, workflow: string, status: string, finished: bool, errors: int, percent: int, tasks: list<array<string, mixed>>} */
    public function toArray(): array
    {
        return [
            'id' => $this->id,
            'workflow' => $this->workflow,
            'status' => $this->status,
            'finished' => $this->isFinished(),
            'errors' => $this->errors,
            'percent' => $this->percent,
            'tasks' => $this->tasks,
        ];
    }
}

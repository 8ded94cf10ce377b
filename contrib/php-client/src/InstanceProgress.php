<?php

declare(strict_types=1);

namespace Jobd;

/**
 * What a progress display needs from an instance (instance.get): status, errors, a percentage and its tasks.
 *
 * The percentage is the mean progression of the tasks the instance's document holds so far, as `jobctl launch
 * --wait` shows it (a loop may add tasks as it goes, so it can step back). toArray() is ready for json_encode()
 * in an AJAX endpoint.
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
        self::collect(is_array($instance['jobs'] ?? null) ? $instance['jobs'] : [], $tasks);
        $percent = 0;
        if ($tasks !== []) {
            $percent = (int) round(array_sum(array_column($tasks, 'progress')) / count($tasks));
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
     * The tasks of a tree of jobs: a job's tasks, then those of its subjobs, as deep as they nest.
     *
     * @param array<mixed> $jobs
     * @param list<array{name: string, status: string|null, progress: int, retval: int|null, job_id: int|null}> $tasks
     */
    private static function collect(array $jobs, array &$tasks): void
    {
        foreach ($jobs as $job) {
            if (!is_array($job)) {
                continue;
            }
            foreach (is_array($job['tasks'] ?? null) ? $job['tasks'] : [] as $task) {
                if (!is_array($task)) {
                    continue;
                }
                $tasks[] = [
                    'name' => (string) ($task['name'] ?? ''),
                    'status' => isset($task['status']) ? (string) $task['status'] : null,
                    'progress' => (int) ($task['progression'] ?? 0),
                    'retval' => isset($task['retval']) && is_numeric($task['retval']) ? (int) $task['retval'] : null,
                    'job_id' => isset($task['job_id']) ? (int) $task['job_id'] : null,
                ];
            }
            self::collect(is_array($job['subjobs'] ?? null) ? $job['subjobs'] : [], $tasks);
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

<?php

declare(strict_types=1);

namespace Jobd\Tests;

use Jobd\Exception\InvalidParamsException;

final class WorkflowsTest extends JobdTestCase
{
    public function testLaunchedInstanceIsWaitedForAndQueried(): void
    {
        $jobd = $this->client();
        self::assertContains('thumbnails', array_column($jobd->workflows(), 'name'));
        $instance = $jobd->launch('thumbnails', ['source' => 'holiday.jpg'], ['comment' => 'from PHPUnit']);
        self::assertIsInt($instance['id']);
        self::assertSame('thumbnails', $instance['workflow']);

        $ended = $jobd->waitInstance($instance['id'], 30);
        self::assertSame('TERMINATED', $ended['status'], json_encode($ended));
        self::assertSame(0, $ended['errors']);
        self::assertSame('from PHPUnit', $ended['comment']);
        self::assertSame(['source' => 'holiday.jpg'], $ended['parameters']);

        $progress = $jobd->instanceProgress($instance['id']);
        self::assertTrue($progress->isFinished());
        self::assertSame(['small', 'large', 'publish'], array_column($progress->tasks, 'name'));
        self::assertSame([0, 0, 0], array_column($progress->tasks, 'retval'));
        $json = json_decode((string) json_encode($progress->toArray()), true);
        self::assertSame($instance['id'], $json['id']);
        self::assertTrue($json['finished']);

        // The tasks ran as jobs with context instance:ID; their output is readable like any job's.
        $jobs = $jobd->list(['context' => 'instance:' . $instance['id']])['jobs'];
        $outputs = array_map(static fn (array $job): string => $jobd->outputText($job['id']), $jobs);
        sort($outputs);
        self::assertSame(['', "large holiday.jpg\n", "small holiday.jpg\n"], $outputs);

        $listed = $jobd->listInstances(['workflow' => 'thumbnails', 'parameters' => ['source' => 'holiday.jpg']]);
        self::assertContains($instance['id'], array_column($listed['instances'], 'id'));
    }

    public function testProgressOfAnEndedInstanceCountsTasksItSkippedAsDone(): void
    {
        $jobd = $this->client();
        $instance = $jobd->launch('gated', []);
        self::assertSame('TERMINATED', $jobd->waitInstance($instance['id'], 30)['status']);
        $progress = $jobd->instanceProgress($instance['id']);
        self::assertSame(['run', 'never'], array_column($progress->tasks, 'name'));
        self::assertSame([0, null], array_column($progress->tasks, 'retval'));
        // As jobctl launch --wait shows it: the task a false condition left out will never run, so it is done.
        self::assertSame(100, $progress->percent);
    }

    public function testEmptyObjectsOfRepliesGoBackToJobdAsObjects(): void
    {
        // Decoded into PHP arrays, jobd's empty objects are empty arrays: an instance without parameters has
        // 'parameters' => [] (and 'counters' => []). Given back to jobd through the client, under every name jobd
        // reads as an object, they are {} again, as jobd requires: a relaunch and a listing filter take them.
        $jobd = $this->client();
        $ended = $jobd->waitInstance($jobd->launch('gated', [])['id'], 30);
        self::assertSame([], $ended['parameters']);
        self::assertSame([], $ended['counters']);
        $again = $jobd->launch('gated', $ended['parameters']);
        $listed = $jobd->listInstances(['workflow' => 'gated', 'parameters' => $ended['parameters']]);
        self::assertContains($again['id'], array_column($listed['instances'], 'id'));
        self::assertSame('TERMINATED', $jobd->waitInstance($again['id'], 30)['status']);
    }

    public function testWaitInstanceWithTimeoutReturnsItExecuting(): void
    {
        $jobd = $this->client();
        $instance = $jobd->launch('slow', []);
        $still = $jobd->waitInstance($instance['id'], 0.2);
        self::assertSame('EXECUTING', $still['status']);
        $cancelled = $jobd->cancelInstance($instance['id']);
        self::assertSame($instance['id'], $cancelled['id']);
        // The sleeping task is a job like any other: stopping it lets the instance end.
        foreach ($jobd->list(['context' => 'instance:' . $instance['id']])['jobs'] as $job) {
            if (!in_array($job['state'], ['succeeded', 'failed', 'timed_out', 'cancelled'], true)) {
                $jobd->cancel($job['id']);
            }
        }
        self::assertSame('TERMINATED', $jobd->waitInstance($instance['id'], 30)['status']);
    }

    public function testMissingWorkflowParameterIsInvalidParams(): void
    {
        try {
            $this->client()->launch('thumbnails', []);
            self::fail('a launch without the declared parameter must fail');
        } catch (InvalidParamsException $e) {
            self::assertSame('INVALID_WORKFLOW_PARAMETERS', $e->getWireCode());
        }
    }

    public function testListingFiltersOnAHundredParametersAndAHundredCustomAttributes(): void
    {
        $jobd = $this->client();
        $instance = $jobd->launch('thumbnails', ['source' => 'many-filters.jpg']);
        self::assertSame('TERMINATED', $jobd->waitInstance($instance['id'], 30)['status']);
        $parameters = ['source' => 'many-filters.jpg'];
        $attributes = [];
        for ($number = 1; $number < 100; $number++) {
            $parameters["absent$number"] = 'x';
            $attributes["absent$number"] = 'x';
        }
        // Every filter applies: a parameter the instance does not have excludes it. A hundred of each used to be
        // refused as jobd's database failing (STORE_FAILED: SQLite's parser overflowed on the nested conditions).
        self::assertSame(0, $jobd->listInstances(['parameters' => $parameters, 'custom_attributes' => $attributes])['total']);
        $listed = $jobd->listInstances(['parameters' => ['source' => 'many-filters.jpg'] + $attributes]);
        self::assertSame(0, $listed['total']);
        $listed = $jobd->listInstances(['parameters' => array_slice($parameters, 0, 1)]);
        self::assertSame([$instance['id']], array_column($listed['instances'], 'id'));
        self::assertNull($jobd->status()['store_trouble'], 'a listing is no trouble of the database');

        $parameters['one_more'] = 'x';
        try {
            $jobd->listInstances(['parameters' => $parameters]);
            self::fail('101 parameter filters must be refused');
        } catch (InvalidParamsException $e) {
            self::assertSame('INVALID_PARAMS', $e->getWireCode());
            self::assertSame('parameters', $e->getData()['param']);
            self::assertStringContainsString('at most 100 launch parameter values, not 101', $e->getMessage());
        }
    }
}

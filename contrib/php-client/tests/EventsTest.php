<?php

declare(strict_types=1);

namespace Jobd\Tests;

use Jobd\Exception\ConnectionException;
use Jobd\Exception\TimeoutException;

final class EventsTest extends JobdTestCase
{
    public function testGeneratorDeliversTheStateChangesOfAJob(): void
    {
        $jobd = $this->client();
        $subscription = $jobd->subscribe(['types' => ['job.state']]);
        self::assertGreaterThan(0, $subscription);
        // Submitted on the subscribed connection itself: events that come before the reply are kept for later.
        $job = $jobd->submit('thumbnail', ['params' => ['SOURCE' => 'dog.png', 'SIZE' => '64']]);
        $states = [];
        foreach ($jobd->events(30) as $event) {
            self::assertSame('job.state', $event['type']);
            self::assertSame($subscription, $event['subscription']);
            if ($event['job']['id'] !== $job['id']) {
                continue;
            }
            $states[] = $event['job']['state'];
            if ($event['job']['state'] === 'succeeded') {
                break;
            }
        }
        self::assertSame('succeeded', end($states), 'the events stopped before the job ended: ' . json_encode($states));
        self::assertContains('running', $states);
    }

    public function testCallbackReceivesProgressAndLogOfAJobSubmittedElsewhere(): void
    {
        $listener = $this->client();
        $listener->subscribe(['queues' => ['default']]);
        $job = $this->client()->submit('thumbnail', ['params' => ['SOURCE' => 'bird.png', 'SIZE' => '32']]);
        $seen = [];
        $count = $listener->listen(static function (array $event) use ($job, &$seen): bool {
            $id = $event['type'] === 'job.state' ? $event['job']['id'] : $event['id'];
            if ($id !== $job['id']) {
                return true;
            }
            $seen[] = match ($event['type']) {
                'job.state' => 'state ' . $event['job']['state'],
                'job.progress' => 'progress ' . $event['progress'],
                'job.log' => 'log ' . $event['line'],
            };
            return $event['type'] !== 'job.state' || $event['job']['state'] !== 'succeeded';
        }, 30);
        self::assertGreaterThanOrEqual(count($seen), $count);
        self::assertContains('progress 50', $seen);
        self::assertContains('log resizing bird.png', $seen);
        self::assertSame('state succeeded', end($seen), json_encode($seen));
    }

    public function testInstanceEventsFollowAWorkflowToItsEnd(): void
    {
        $jobd = $this->client();
        $jobd->subscribe(['workflows' => ['thumbnails']]);
        $instance = $jobd->launch('thumbnails', ['source' => 'events.png']);
        $seen = [];
        foreach ($jobd->events(30) as $event) {
            $id = $event['type'] === 'instance.state' ? $event['instance']['id'] : $event['id'];
            if ($id !== $instance['id']) {
                continue;
            }
            $seen[] = $event['type'] === 'instance.state'
                ? 'state ' . $event['instance']['status']
                : 'task ' . $event['task']['name'];
            if ($event['type'] === 'instance.state' && $event['instance']['status'] === 'TERMINATED') {
                self::assertSame(100, $event['progress']);
                break;
            }
        }
        self::assertSame('state TERMINATED', end($seen), json_encode($seen));
        foreach (['task small', 'task large', 'task publish'] as $task) {
            self::assertContains($task, $seen);
        }
    }

    public function testIdleGeneratorEndsAndConnectionStaysUsable(): void
    {
        $jobd = $this->client();
        // Jobs of a queue nobody uses: no event will come.
        $jobd->subscribe(['queues' => ['idle']]);
        self::assertSame([], iterator_to_array($jobd->events(0.2)));
        self::assertTrue($jobd->ping()['pong']);
    }

    public function testEventsWithoutSubscriptionIsAnError(): void
    {
        $this->expectException(\LogicException::class);
        iterator_to_array($this->client()->events(0.1));
    }

    public function testEventsAfterACallTimedOutSayTheSubscriptionEndedWithItsConnection(): void
    {
        // A call that times out closes the connection (its late reply would be taken for the next one's), and the
        // subscription with it: events() said "call subscribe() first", as if none had been made.
        $jobd = $this->client();
        $jobd->subscribe(['types' => ['job.state']]);
        $job = $jobd->submit('thumbnail', ['params' => ['SOURCE' => 'late.png', 'SIZE' => '8'], 'delay' => 3600]);
        try {
            $jobd->call('job.wait', ['id' => $job['id'], 'timeout' => 60], 0.2); // the job waits an hour
            self::fail('the wait did not time out');
        } catch (TimeoutException) {
        }
        try {
            iterator_to_array($jobd->events(0.1));
            self::fail('events() went on without the subscription');
        } catch (ConnectionException $e) {
            self::assertStringContainsString('the subscription ended with its connection', $e->getMessage());
            self::assertStringContainsString('timed out', $e->getMessage());
        }
        $this->client()->cancel($job['id']);
    }
}

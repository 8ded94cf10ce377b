<?php

declare(strict_types=1);

namespace Jobd\Tests;

use Jobd\Client;
use Jobd\Exception\NotFoundException;
use Jobd\Exception\StateException;

final class JobsTest extends JobdTestCase
{
    public function testSubmittedTaskIsWaitedForAndItsOutputRead(): void
    {
        $jobd = $this->client();
        $job = $jobd->submit('thumbnail', [
            'params' => ['SOURCE' => 'upload/cat.png', 'SIZE' => '128'],
            'context' => 'user-17',
        ]);
        self::assertIsInt($job['id']);
        self::assertSame('thumbnail', $job['task']);
        self::assertSame('default', $job['queue']);
        self::assertSame('user-17', $job['context']);

        $done = $jobd->wait($job['id'], 30);
        self::assertSame('succeeded', $done['state'], json_encode($done));
        self::assertSame(0, $done['exit_code']);
        self::assertSame("thumbnail 128 of upload/cat.png\n", $jobd->outputText($job['id']));
        self::assertSame("resizing upload/cat.png\n", $jobd->outputText($job['id'], 'log'));

        $got = $jobd->get($job['id']);
        self::assertSame('succeeded', $got['state']);
        self::assertCount(1, $got['tries']);
        self::assertSame('succeeded', $got['tries'][0]['outcome']);

        $listed = $jobd->list(['context' => 'user-17', 'limit' => 10]);
        self::assertContains($job['id'], array_column($listed['jobs'], 'id'));
    }

    public function testAdHocCommandWithStdin(): void
    {
        $jobd = $this->client();
        $job = $jobd->submit(['/bin/sh', '-c', 'tr a-z A-Z; echo "$0" >&2', 'arg0'], ['stdin' => "héllo\n"]);
        $done = $jobd->wait($job['id'], 30);
        self::assertSame('succeeded', $done['state']);
        self::assertSame("HéLLO\n", $jobd->outputText($job['id']));
        self::assertSame("arg0\n", $jobd->outputText($job['id'], 'stderr'));
    }

    public function testBinaryStdinIsSentAsItsBytes(): void
    {
        // An uploaded image, say: not UTF-8, so JSON cannot carry it as text. It goes as stdin_base64, as jobctl
        // sends such a file; it used to raise InvalidArgumentException.
        $image = "\x89PNG\r\n\x1a\n\x00\xff\xfe\xc3(" . random_bytes(64);
        $jobd = $this->client();
        $job = $jobd->submit(['/bin/cat'], ['stdin' => $image]);
        self::assertSame('succeeded', $jobd->wait($job['id'], 30)['state']);
        self::assertSame(bin2hex($image), bin2hex($jobd->outputText($job['id'])));
        [$batched] = $jobd->submitMany([[['/bin/cat'], ['stdin' => $image]]]);
        self::assertSame('succeeded', $jobd->wait($batched['id'], 30)['state']);
        self::assertSame(bin2hex($image), bin2hex($jobd->outputText($batched['id'])));
    }

    public function testOutputOfAJobThatHasNotRunIsEmptyNotAJobThatIsNotThere(): void
    {
        $jobd = $this->client();
        $job = $jobd->submit(['/bin/echo', 'later'], ['delay' => 3600]);
        // As jobctl log: no output yet. It used to be a NotFoundException, "job N has no attempt 0 (it has 0)".
        self::assertSame('', $jobd->outputText($job['id']));
        self::assertSame('', $jobd->outputText($job['id'], 'stderr'));
        try {
            $jobd->output($job['id']); // the raw page: job.output's own answer, which tells why
            self::fail('a job that has not run has no page of output');
        } catch (NotFoundException $e) {
            self::assertSame('UNKNOWN_JOB', $e->getWireCode());
            self::assertSame(['id' => $job['id'], 'attempts' => 0, 'state' => 'delayed'], $e->getData());
            self::assertStringContainsString("job {$job['id']} has not run yet (delayed): it has no output", $e->getMessage());
        }
        self::assertSame('cancelled', $jobd->cancel($job['id'])['state']);
        self::assertSame('', $jobd->outputText($job['id']));
        foreach ([static fn () => $jobd->outputText($job['id'], 'stdout', 1), static fn () => $jobd->outputText(987654321)] as $ask) {
            try {
                $ask(); // an attempt it never had, a job that does not exist: still not found
                self::fail('must be refused');
            } catch (NotFoundException $e) {
                self::assertSame('UNKNOWN_JOB', $e->getWireCode());
            }
        }
    }

    public function testWaitWithAnInfiniteTimeoutWaitsWithoutLimit(): void
    {
        // INF is "no limit" for the client's own timeouts; here it was a JSON encoding error.
        $jobd = $this->client();
        $job = $jobd->submit(['/bin/echo', 'done']);
        self::assertSame('succeeded', $jobd->wait($job['id'], INF)['state']);
        $instance = $jobd->launch('gated', []);
        self::assertSame('TERMINATED', $jobd->waitInstance($instance['id'], INF)['status']);
        $this->expectException(\InvalidArgumentException::class);
        $this->expectExceptionMessage('wait(): the timeout is a number of seconds >= 0, or null or INF for no limit');
        $jobd->wait($job['id'], NAN);
    }

    public function testOutputOverManyPagesIsReadWholeAndExact(): void
    {
        // 2.5 MB of "é\n": three pages of at most 1 MiB, whose ends cut an "é" (2 bytes) in two.
        $jobd = $this->client();
        $size = 2_500_000;
        $job = $jobd->submit(['/bin/sh', '-c', "yes é | head -c $size"], ['max_output' => 4_000_000]);
        self::assertSame('succeeded', $jobd->wait($job['id'], 30)['state']);
        $output = $jobd->outputText($job['id']);
        self::assertSame($size, strlen($output));
        self::assertSame(substr(str_repeat("é\n", intdiv($size, 3) + 1), 0, $size), $output);
    }

    public function testEmptyParameterMapsAreSentAsObjects(): void
    {
        // PHP encodes [] as a JSON list; jobd wants objects for params, env and retry, and would refuse a list.
        $jobd = $this->client();
        $job = $jobd->submit(['/bin/true'], ['params' => [], 'env' => []]);
        self::assertSame('succeeded', $jobd->wait($job['id'], 30)['state']);
        // An empty retry is the defaults (no retry), as {} is: it was refused, "retry = [] is not allowed".
        $job = $jobd->submit(['/bin/true'], ['retry' => []]);
        self::assertSame(0, $job['retry']['times']);
        self::assertSame('succeeded', $jobd->wait($job['id'], 30)['state']);
    }

    public function testAdHocHttpJobIsSubmittedAsItsRequest(): void
    {
        // job.submit's ad-hoc HTTP job (admins): submit() refused `http` in the options, saying it goes in the first
        // argument, which took only a task name or an argv list; an array with a `url` is now that request.
        $server = stream_socket_server('tcp://127.0.0.1:0', $errno, $errstr);
        self::assertIsResource($server, $errstr);
        $address = stream_socket_get_name($server, false);
        $jobd = $this->client();
        $job = $jobd->submit(
            ['url' => "http://$address/notify/__JOBID__", 'method' => 'POST', 'body' => 'done', 'headers' => []],
            ['context' => 'http-test'],
        );
        self::assertSame([], $job['command']);
        self::assertSame('POST', $job['http']['method']);
        // jobd's request, answered here: the job succeeds with the response body as its stdout.
        $peer = stream_socket_accept($server, 30);
        self::assertIsResource($peer);
        $request = '';
        while (!str_contains($request, "\r\n\r\ndone") && !feof($peer)) {
            $request .= fread($peer, 8192);
        }
        fwrite($peer, "HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\nnotified");
        fclose($peer);
        fclose($server);
        self::assertStringStartsWith("POST /notify/{$job['id']} HTTP/1.1\r\n", $request);
        self::assertSame('succeeded', $jobd->wait($job['id'], 30)['state']);
        self::assertSame('notified', $jobd->outputText($job['id']));
        // In a batch too; and `http` among the options says where it goes.
        [$batched] = $jobd->submitMany([[['url' => "http://$address/batched"], ['delay' => 3600]]]);
        self::assertSame("http://$address/batched", $batched['http']['url']);
        self::assertSame('cancelled', $jobd->cancel($batched['id'])['state']);
        try {
            $jobd->submit(['/bin/true'], ['http' => ['url' => "http://$address/"]]);
            self::fail('http among the options must be refused');
        } catch (\InvalidArgumentException $e) {
            self::assertStringContainsString('an HTTP request (an array with its url)', $e->getMessage());
        }
        try {
            $jobd->submit(array_filter(['/bin/echo', '', 'x'])); // keys 0 and 2: neither an argv nor a request
            self::fail('an array keyed by numbers that is no list must be refused');
        } catch (\InvalidArgumentException $e) {
            self::assertStringContainsString('array_values()', $e->getMessage());
        }
    }

    public function testBatchSubmitsAllJobs(): void
    {
        $jobd = $this->client();
        $jobs = $jobd->submitMany([
            ['thumbnail', ['params' => ['SOURCE' => 'a.png', 'SIZE' => '1']]],
            [['/bin/echo', 'second']],
        ]);
        self::assertCount(2, $jobs);
        self::assertSame("thumbnail 1 of a.png\n", $this->outputOnceDone($jobs[0]['id']));
        self::assertSame("second\n", $this->outputOnceDone($jobs[1]['id']));
    }

    public function testWaitWithTimeoutReturnsTheJobStillRunning(): void
    {
        $jobd = $this->client();
        $job = $jobd->submit('sleeper');
        // The daemon waits 0.2 s and answers with the job as it is; the sleeper runs for a minute.
        $still = $jobd->wait($job['id'], 0.2);
        self::assertContains($still['state'], ['queued', 'running']);
        $jobd->cancel($job['id']);
    }

    public function testCancelWaitsOutTheJobsKillGraceBeyondTheClientsTimeout(): void
    {
        // The daemon's kill_grace is 2 s; the client's own timeout, 0.5 s, is for ordinary calls.
        $jobd = new Client($this->socketPath(), timeout: 0.5);
        $jobd->subscribe(['types' => ['job.progress']]);
        // Its progress line says the trap is set: a SIGTERM before that would end it at once.
        $job = $jobd->submit(['/bin/sh', '-c', "trap '' TERM; echo %50 >&3; exec /bin/sleep 60"]);
        foreach ($jobd->events(30) as $event) {
            if ($event['id'] === $job['id']) {
                break;
            }
        }
        // Its SIGTERM is ignored: only the SIGKILL after the kill_grace ends it, and the answer comes then.
        self::assertSame('cancelled', $jobd->cancel($job['id'])['state']);
        $jobd->close();
    }

    public function testCancelStopsARunningJobAndSecondCancelIsRefused(): void
    {
        $jobd = $this->client();
        $jobd->subscribe(['types' => ['job.state']]);
        $job = $jobd->submit('sleeper');
        // Cancel it once it runs, so that the daemon has a process to stop.
        foreach ($jobd->events(30) as $event) {
            if ($event['job']['id'] === $job['id'] && $event['job']['state'] === 'running') {
                break;
            }
        }
        $cancelled = $jobd->cancel($job['id']);
        self::assertSame('cancelled', $cancelled['state']);
        self::assertSame('cancelled', $jobd->wait($job['id'], 30)['state']);
        self::assertSame('killed', $jobd->get($job['id'])['tries'][0]['outcome']);

        try {
            $jobd->cancel($job['id']);
            self::fail('cancelling a cancelled job must fail');
        } catch (StateException $e) {
            self::assertSame('JOB_FINISHED', $e->getWireCode());
            self::assertSame(-32005, $e->getRpcCode());
        }
        // The connection is still usable after an error reply.
        self::assertTrue($jobd->ping()['pong']);
    }

    private function outputOnceDone(int $id): string
    {
        $jobd = $this->client();
        self::assertSame('succeeded', $jobd->wait($id, 30)['state']);
        return $jobd->outputText($id);
    }
}

<?php

declare(strict_types=1);

namespace Jobd\Tests;

use Jobd\Client;
use PHPUnit\Framework\TestCase;

/**
 * Base of the tests: a client of the real jobd whose socket is in JOBD_TEST_SOCKET.
 *
 * That daemon is configured by tests/test_php_composer_client.py (jobd's source tree): a `default` queue, the
 * tasks `thumbnail` (parameters SOURCE and SIZE as environment variables; reports progress 50 and a log line on
 * fd 3) and `sleeper` (sleeps a minute), the workflows `thumbnails` (parameter `source`), `slow` (a task that
 * sleeps a minute) and `gated` (a task, then a job whose condition is false). JOBD_TEST_EVQUEUE_SOCKET names its
 * evqueue_socket (evQueue's XML protocol), which a client pointed at the wrong socket meets.
 */
abstract class JobdTestCase extends TestCase
{
    /** @var list<Client> */
    private array $clients = [];

    protected function socketPath(): string
    {
        $path = getenv('JOBD_TEST_SOCKET');
        if (!is_string($path) || $path === '') {
            // Not a skip: a run that tests nothing must not pass.
            self::fail('JOBD_TEST_SOCKET must name the socket of a running jobd (see phpunit.xml.dist)');
        }
        return $path;
    }

    protected function client(): Client
    {
        $client = new Client($this->socketPath());
        $this->clients[] = $client;
        return $client;
    }

    protected function tearDown(): void
    {
        foreach ($this->clients as $client) {
            $client->close();
        }
        $this->clients = [];
    }
}

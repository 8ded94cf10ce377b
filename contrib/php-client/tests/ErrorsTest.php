<?php

declare(strict_types=1);

namespace Jobd\Tests;

use Jobd\Client;
use Jobd\Exception\ConnectionException;
use Jobd\Exception\InvalidParamsException;
use Jobd\Exception\JobdException;
use Jobd\Exception\NotFoundException;
use Jobd\Exception\PermissionDeniedException;
use Jobd\Exception\ProtocolException;
use Jobd\Exception\RemoteException;
use Jobd\Exception\RequestException;
use Jobd\Exception\SocketNotFoundException;

final class ErrorsTest extends JobdTestCase
{
    public function testUnknownQueueIsANotFoundExceptionWithItsWireCode(): void
    {
        try {
            $this->client()->submit('thumbnail', ['queue' => 'nope', 'params' => ['SOURCE' => 'x', 'SIZE' => '1']]);
            self::fail('a submit to an unknown queue must fail');
        } catch (NotFoundException $e) {
            self::assertInstanceOf(RemoteException::class, $e);
            self::assertInstanceOf(JobdException::class, $e);
            self::assertSame('UNKNOWN_QUEUE', $e->getWireCode());
            self::assertSame(-32001, $e->getRpcCode());
            self::assertSame(-32001, $e->getCode());
            self::assertSame('nope', $e->getData()['queue']);
            self::assertContains('default', $e->getData()['allowed']);
            self::assertStringContainsString("unknown queue 'nope'", $e->getMessage());
        }
    }

    public function testUnknownTaskAndJobAndWorkflow(): void
    {
        $jobd = $this->client();
        $codes = [];
        foreach ([
            static fn () => $jobd->submit('no-such-task'),
            static fn () => $jobd->get(987654321),
            static fn () => $jobd->launch('no-such-workflow'),
            static fn () => $jobd->getInstance(987654321),
        ] as $call) {
            try {
                $call();
                self::fail('expected a NotFoundException');
            } catch (NotFoundException $e) {
                $codes[] = $e->getWireCode();
            }
        }
        self::assertSame(['UNKNOWN_TASK', 'UNKNOWN_JOB', 'UNKNOWN_WORKFLOW', 'UNKNOWN_INSTANCE'], $codes);
    }

    public function testBadParameterIsAnInvalidParamsExceptionNamingIt(): void
    {
        try {
            $this->client()->submit(['/bin/true'], ['priority' => -1]);
            self::fail('a negative priority must be refused');
        } catch (InvalidParamsException $e) {
            self::assertSame('INVALID_PARAMS', $e->getWireCode());
            self::assertSame('priority', $e->getData()['param']);
        }
    }

    public function testUnknownMethodIsARequestException(): void
    {
        try {
            $this->client()->call('job.frobnicate');
            self::fail('an unknown method must be refused');
        } catch (RequestException $e) {
            self::assertSame('METHOD_NOT_FOUND', $e->getWireCode());
            self::assertContains('job.submit', $e->getData()['allowed']);
        }
    }

    public function testRequestOverOneMebibyteIsRefusedAndTheNextCallWorks(): void
    {
        $jobd = $this->client();
        try {
            $jobd->submit(['/bin/cat'], ['stdin' => str_repeat('x', 2 * 1024 * 1024)]);
            self::fail('a request line over 1 MiB must be refused');
        } catch (RequestException $e) {
            self::assertSame('FRAME_TOO_LARGE', $e->getWireCode());
        }
        // jobd closed that connection; the client opens a new one.
        self::assertTrue($jobd->ping()['pong']);
    }

    public function testMissingSocketSaysSo(): void
    {
        $path = sys_get_temp_dir() . '/jobd-php-test-' . getmypid() . '/none.sock';
        try {
            (new Client($path))->ping();
            self::fail('connecting to a missing socket must fail');
        } catch (SocketNotFoundException $e) {
            self::assertNull($e->getWireCode());
            self::assertStringContainsString("no socket at $path", $e->getMessage());
            self::assertStringContainsString('is jobd running', $e->getMessage());
        }
    }

    public function testASocketPathTooLongForTheKernelIsRefusedNotCutShort(): void
    {
        // PHP cut such a path to its first 107 bytes and connected to whatever socket those named: here jobd's own,
        // reached through a path of 107 bytes that a longer, wrong one begins with.
        $socket = $this->socketPath();
        $padding = str_repeat('/', Client::MAX_SOCKET_PATH - strlen($socket));
        $exact = dirname($socket) . $padding . '/' . basename($socket);
        self::assertSame(Client::MAX_SOCKET_PATH, strlen($exact));
        self::assertTrue((new Client($exact))->ping()['pong'], 'a path of exactly 107 bytes is taken');
        try {
            new Client($exact . '-missing');
            self::fail('a socket path over 107 bytes must be refused');
        } catch (\InvalidArgumentException $e) {
            self::assertStringContainsString('the socket path is 115 bytes long', $e->getMessage());
            self::assertStringContainsString('at most 107', $e->getMessage());
        }
    }

    public function testAnEmptyJobdSocketVariableIsRefusedNotTakenForTheDefault(): void
    {
        $before = getenv('JOBD_SOCKET');
        putenv('JOBD_SOCKET=');
        try {
            new Client();
            self::fail('an empty JOBD_SOCKET must be refused');
        } catch (\InvalidArgumentException $e) {
            self::assertSame(
                "JOBD_SOCKET is set but empty: expected the path of jobd's API socket (unset it for the default, "
                . '/run/jobd/jobd.sock)',
                $e->getMessage()
            );
        } finally {
            putenv(is_string($before) ? "JOBD_SOCKET=$before" : 'JOBD_SOCKET');
        }
        putenv('JOBD_SOCKET=' . $this->socketPath());
        try {
            self::assertTrue((new Client())->ping()['pong'], 'a JOBD_SOCKET that names the socket is taken');
        } finally {
            putenv(is_string($before) ? "JOBD_SOCKET=$before" : 'JOBD_SOCKET');
        }
    }

    public function testAPathThatIsNoSocketSaysWhatItIs(): void
    {
        // As jobctl says it: a file or a directory at the path is a wrong path, not a jobd that is not running.
        $dir = $this->temporaryDirectory();
        file_put_contents("$dir/jobd.conf", "not a socket\n");
        foreach (["$dir/jobd.conf" => 'a regular file', $dir => 'a directory'] as $path => $what) {
            try {
                (new Client($path))->ping();
                self::fail("connecting to $what must fail");
            } catch (SocketNotFoundException $e) {
                self::assertStringContainsString("$path: it is $what, not a socket", $e->getMessage());
                self::assertStringNotContainsString('jobd is not running', $e->getMessage());
            }
        }
    }

    public function testJobdsEvQueueSocketIsNamedAsSuch(): void
    {
        // jobd's other socket speaks evQueue's XML: say so, and which socket the client needs, on every call.
        $path = getenv('JOBD_TEST_EVQUEUE_SOCKET');
        self::assertIsString($path, 'JOBD_TEST_EVQUEUE_SOCKET must name the evqueue_socket of the jobd under test');
        $jobd = new Client($path);
        for ($call = 0; $call < 2; $call++) {
            try {
                $jobd->ping();
                self::fail('the evQueue socket does not speak JSON-RPC');
            } catch (ProtocolException $e) {
                self::assertNull($e->getWireCode());
                self::assertStringContainsString("$path speaks XML (evQueue's protocol", $e->getMessage());
                self::assertStringContainsString('[daemon] socket', $e->getMessage());
            }
        }
    }

    public function testAnUnexpectedReplyIsQuotedAsItWasSent(): void
    {
        // A peer that is not in step with the client (not jobd, or jobd and a client shared across a fork): the
        // message quotes the reply as it came. Decoded into PHP arrays, an empty object `{}` was quoted as `[]`, a
        // list, which is not what was sent.
        $sent = [
            '{"jsonrpc":"2.0","id":99,"result":{"jobs":{},"tags":[]}}' => 'unexpected message from jobd: ',
            '{"jsonrpc":"2.0","id":1,"outcome":{}}' => 'reply has neither result nor error: ',
        ];
        $dir = $this->temporaryDirectory();
        foreach ($sent as $reply => $why) {
            $path = "$dir/peer.sock";
            @unlink($path);
            $server = stream_socket_server("unix://$path");
            self::assertIsResource($server);
            $jobd = new Client($path);
            $jobd->connect();
            $peer = stream_socket_accept($server);
            self::assertIsResource($peer);
            fwrite($peer, "$reply\n"); // already there when the client reads the reply to its first request (id 1)
            try {
                $jobd->ping();
                self::fail("the reply $reply must be refused");
            } catch (ProtocolException $e) {
                self::assertSame($why . $reply, $e->getMessage());
            } finally {
                fclose($peer);
                fclose($server);
            }
        }
    }

    public function testStaleSocketSaysNothingListens(): void
    {
        $dir = $this->temporaryDirectory();
        $path = "$dir/stale.sock";
        $server = stream_socket_server("unix://$path");
        self::assertIsResource($server);
        fclose($server); // the file stays, nobody listens: what a crashed daemon leaves
        try {
            (new Client($path))->ping();
            self::fail('connecting to a stale socket must fail');
        } catch (SocketNotFoundException $e) {
            self::assertStringContainsString('nothing listens on it', $e->getMessage());
        }
    }

    public function testPermissionDeniedSaysWhatToDo(): void
    {
        $dir = $this->temporaryDirectory();
        $path = "$dir/closed.sock";
        $server = stream_socket_server("unix://$path");
        self::assertIsResource($server);
        chmod($path, 0o600);
        $result = posix_geteuid() === 0 ? $this->connectAsNobody($path) : $this->connectHere($path);
        fclose($server);
        self::assertSame(PermissionDeniedException::class, $result['class'], $result['message']);
        self::assertStringContainsString('permission denied', $result['message']);
        self::assertStringContainsString("add the user 'nobody' to that group", $result['message']);
    }

    /** @return array{class: string, message: string} */
    private function connectHere(string $path): array
    {
        try {
            (new Client($path))->ping();
            return ['class' => '', 'message' => 'connected'];
        } catch (ConnectionException $e) {
            return ['class' => $e::class, 'message' => $e->getMessage()];
        }
    }

    /**
     * Root may connect to any socket, so the refusal is seen from a child that became nobody.
     *
     * @return array{class: string, message: string}
     */
    private function connectAsNobody(string $path): array
    {
        // Loaded before the fork: the child may no longer read this tree once it is nobody.
        class_exists(PermissionDeniedException::class);
        class_exists(SocketNotFoundException::class);
        [$parentEnd, $childEnd] = stream_socket_pair(STREAM_PF_UNIX, STREAM_SOCK_STREAM, STREAM_IPPROTO_IP);
        $pid = pcntl_fork();
        self::assertNotSame(-1, $pid, 'fork failed');
        if ($pid === 0) {
            fclose($parentEnd);
            $nobody = posix_getpwnam('nobody');
            $dropped = is_array($nobody) && posix_setgid($nobody['gid']) && posix_setuid($nobody['uid']);
            $result = $dropped ? $this->connectHere($path) : ['class' => '', 'message' => 'could not become nobody'];
            fwrite($childEnd, json_encode($result));
            fclose($childEnd);
            // Straight out: PHPUnit's shutdown functions belong to the parent.
            posix_kill(posix_getpid(), SIGKILL);
        }
        fclose($childEnd);
        $reply = stream_get_contents($parentEnd);
        fclose($parentEnd);
        pcntl_waitpid($pid, $status);
        $result = json_decode((string) $reply, true);
        self::assertIsArray($result, "the child reported nothing: $reply");
        return $result;
    }

    private function temporaryDirectory(): string
    {
        $dir = sys_get_temp_dir() . '/jobd-php-' . bin2hex(random_bytes(6));
        mkdir($dir, 0o755);
        register_shutdown_function(static function () use ($dir): void {
            array_map('unlink', glob("$dir/*") ?: []);
            @rmdir($dir);
        });
        return $dir;
    }
}

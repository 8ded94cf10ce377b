<?php

declare(strict_types=1);

namespace Jobd;

use Jobd\Exception\ConnectionException;
use Jobd\Exception\ErrorMap;
use Jobd\Exception\JobdException;
use Jobd\Exception\PermissionDeniedException;
use Jobd\Exception\ProtocolException;
use Jobd\Exception\SocketNotFoundException;
use Jobd\Exception\TimeoutException;

/**
 * A connection to jobd's API socket: JSON-RPC 2.0, one JSON text per line (docs/protocol.md).
 *
 * Synchronous: each call sends one request and reads until its reply. `event` notifications (after subscribe())
 * that arrive meanwhile are kept, in order, for events()/listen(). Everything blocks on the socket itself
 * (stream_select with the deadline): the client never sleeps or polls, and waiting for a job or an instance
 * happens in the daemon (job.wait, instance.wait).
 *
 * Needs PHP >= 8.1 and its core streams (unix:// sockets) and json; no other extension.
 * Not for sharing between processes (forked children must open their own).
 */
final class Client
{
    public const DEFAULT_SOCKET = '/run/jobd/jobd.sock';
    public const MAX_SOCKET_PATH = 107; // bytes in sockaddr_un's sun_path, its NUL excluded

    /** A reply line longer than this is taken for a broken peer, not buffered without end. */
    private const MAX_LINE = 64 * 1024 * 1024;
    private const READ_CHUNK = 256 * 1024;

    /**
     * Parameters that jobd expects as JSON objects: an empty PHP array would be encoded as `[]` and refused.
     */
    private const OBJECT_PARAMS = [
        'params', 'env', 'parameters', 'custom_attributes', 'headers', 'callbacks', 'retry', 'http',
    ];

    /** @var resource|null */
    private $stream = null;
    private string $buffer = '';
    private int $nextId = 1;
    /** @var list<array<string, mixed>> */
    private array $events = [];
    /** Whether the open connection carries a subscription (a reconnection would silently lose it). */
    private bool $subscribed = false;
    /** Why the connection of the last subscription was closed under it (a call timed out or broke), for events(). */
    private ?string $subscriptionLost = null;
    /**
     * The last message read, as it came: errors quote it so. Decoded into PHP arrays, an empty object `{}` would
     * read `[]`, as an empty list does.
     */
    private string $lastMessage = '';
    private readonly string $socketPath;

    /**
     * @param string|null $socketPath jobd's API socket; null: $JOBD_SOCKET, else /run/jobd/jobd.sock (JOBD_SOCKET
     *                                set but empty is an InvalidArgumentException)
     * @param float $timeout seconds an ordinary call may take (INF: no limit). The server-side waits of wait()
     *                       and waitInstance() get their own timeout on top of it.
     * @param float $connectTimeout seconds to wait for the connection to be accepted
     */
    public function __construct(
        ?string $socketPath = null,
        private readonly float $timeout = 30.0,
        private readonly float $connectTimeout = 5.0,
    ) {
        if ($socketPath === null) {
            $fromEnv = getenv('JOBD_SOCKET');
            if ($fromEnv === '') {
                // As jobctl refuses it: a script's JOBD_SOCKET=$SOCK with SOCK unset, which must not reach the
                // system's jobd instead of the one meant.
                throw new \InvalidArgumentException(
                    "JOBD_SOCKET is set but empty: expected the path of jobd's API socket (unset it for the default, "
                    . self::DEFAULT_SOCKET . ')'
                );
            }
            $socketPath = is_string($fromEnv) ? $fromEnv : self::DEFAULT_SOCKET;
        }
        if ($socketPath === '' || str_contains($socketPath, "\0")) {
            throw new \InvalidArgumentException('the socket path must be a non-empty path without NUL bytes');
        }
        // A Unix socket's address holds 107 bytes and a NUL: PHP would cut a longer path short, silently, and connect
        // to whatever socket the first 107 bytes name.
        if (strlen($socketPath) > self::MAX_SOCKET_PATH) {
            throw new \InvalidArgumentException(
                'the socket path is ' . strlen($socketPath) . ' bytes long; a Unix socket path has at most '
                . self::MAX_SOCKET_PATH . ' (use a shorter path, or a symlink to its directory)'
            );
        }
        if (!($timeout > 0) || !($connectTimeout > 0)) {
            throw new \InvalidArgumentException('timeouts must be positive numbers of seconds (INF for no limit)');
        }
        $this->socketPath = $socketPath;
    }

    public function __destruct()
    {
        $this->close();
    }

    public function getSocketPath(): string
    {
        return $this->socketPath;
    }

    // -- connection -------------------------------------------------------------------------------------------

    /**
     * Opens the connection (the first call does it if nobody did).
     *
     * @throws SocketNotFoundException no socket at the path, or nothing listening on it
     * @throws PermissionDeniedException the socket may not be opened by this user
     * @throws ConnectionException any other failure
     */
    public function connect(): void
    {
        if ($this->stream !== null) {
            return;
        }
        $errno = 0;
        $errstr = '';
        // The warning PHP emits on failure would only repeat what the exception says.
        $stream = @stream_socket_client(
            'unix://' . $this->socketPath,
            $errno,
            $errstr,
            is_finite($this->connectTimeout) ? $this->connectTimeout : null,
        );
        if ($stream === false) {
            throw $this->connectError($errno, $errstr);
        }
        $this->stream = $stream;
        $this->buffer = '';
        $this->events = [];
        $this->subscribed = false;
    }

    /** Closes the connection; subscriptions end with it. The next call opens a new one. */
    public function close(): void
    {
        if ($this->stream !== null) {
            fclose($this->stream);
            $this->stream = null;
        }
        $this->buffer = '';
        $this->subscribed = false;
        $this->subscriptionLost = null;
    }

    /** Closes a connection a call left out of step; a subscription on it ends, and events() will say why. */
    private function drop(\Throwable $cause): void
    {
        $lost = $this->subscribed ? $cause->getMessage() : null;
        $this->close();
        $this->subscriptionLost = $lost;
    }

    private function connectError(int $errno, string $errstr): ConnectionException
    {
        $path = $this->socketPath;
        $reason = $errstr !== '' ? $errstr : "errno $errno";
        // connect(2) refuses a path that is no socket as it refuses a socket nobody listens on (ECONNREFUSED): a
        // file or directory there is a wrong path, not a jobd that is not running.
        $what = @is_dir($path) ? 'a directory' : (@is_file($path) ? 'a regular file' : null);
        if ($what !== null && $errno !== 13 && $errno !== 1) {
            return new SocketNotFoundException(
                "cannot connect to jobd at $path: it is $what, not a socket; point the client (or JOBD_SOCKET) at "
                . "jobd's API socket, its [daemon] socket"
            );
        }
        // Linux errno values: stream_socket_client reports connect(2)'s errno.
        return match ($errno) {
            2 => new SocketNotFoundException(
                "cannot connect to jobd: no socket at $path ($reason); is jobd running, and is this its "
                . '[daemon] socket? (pass the path, or set JOBD_SOCKET)'
            ),
            111 => new SocketNotFoundException(
                "cannot connect to jobd at $path: nothing listens on it ($reason); jobd is not running"
            ),
            13, 1 => new PermissionDeniedException(
                "cannot connect to jobd at $path: permission denied ($reason); the socket is for root and jobd's "
                . 'group: add ' . self::currentUser() . ' to that group (and restart PHP-FPM or the web server)'
            ),
            default => new ConnectionException("cannot connect to jobd at $path: $reason"),
        };
    }

    private static function currentUser(): string
    {
        if (function_exists('posix_geteuid') && function_exists('posix_getpwuid')) {
            $entry = posix_getpwuid(posix_geteuid());
            if (is_array($entry)) {
                return "the user '{$entry['name']}'";
            }
        }
        return "this process's user";
    }

    // -- jobs -------------------------------------------------------------------------------------------------

    /**
     * Submits a job: a configured task (a string, its name), an ad-hoc command (a list of strings, its argv; admins
     * only) or an ad-hoc HTTP job (an array with its `url`, job.submit's `http`: url, method, headers, params, body,
     * timeout, expect_status; admins only). `$options` are job.submit's other parameters: queue, priority, delay,
     * timeout, args, params, env, stdin, context, key, merge_stderr, callbacks, working_dir, retry, kill_grace,
     * max_output. A `stdin` that is not UTF-8 (binary data) is sent as `stdin_base64`.
     *
     * Returns the job once jobd has committed it (its `id`, `state`, …).
     *
     * @param string|list<string>|array<string, mixed> $taskOrCommand
     * @param array<string, mixed> $options
     * @return array<string, mixed>
     */
    public function submit(string|array $taskOrCommand, array $options = []): array
    {
        return $this->callArray('job.submit', self::submitParams($taskOrCommand, $options));
    }

    /**
     * Submits several jobs in one transaction: all are committed, or none (an error names the member).
     * Each member is [task name, argv or HTTP request, options].
     *
     * @param list<array{0: string|list<string>|array<string, mixed>, 1?: array<string, mixed>}> $jobs
     * @return list<array<string, mixed>>
     */
    public function submitMany(array $jobs): array
    {
        if ($jobs === [] || !array_is_list($jobs)) {
            throw new \InvalidArgumentException(
                'submitMany() takes a non-empty list of [task, argv or HTTP request, options]'
            );
        }
        $members = [];
        foreach ($jobs as $index => $job) {
            if (!is_array($job) || !isset($job[0])) {
                throw new \InvalidArgumentException(
                    "submitMany(): member $index is not [task, argv or HTTP request, options]"
                );
            }
            $members[] = self::submitParams($job[0], $job[1] ?? []);
        }
        $result = $this->callArray('job.submit', ['jobs' => $members]);
        return $result['jobs'];
    }

    /**
     * @param string|list<string>|array<string, mixed> $taskOrCommand
     * @param array<string, mixed> $options
     * @return array<string, mixed>
     */
    private static function submitParams(string|array $taskOrCommand, array $options): array
    {
        foreach (['task', 'command', 'http', 'jobs'] as $reserved) {
            if (array_key_exists($reserved, $options)) {
                throw new \InvalidArgumentException(
                    "submit(): '$reserved' goes in the first argument (a task name, an argv list, or an HTTP request "
                    . '(an array with its url)), not in the options'
                );
            }
        }
        if (isset($options['stdin']) && is_string($options['stdin']) && preg_match('//u', $options['stdin']) !== 1) {
            // Bytes that are not UTF-8 (an uploaded file): JSON carries them as base64, as jobctl sends such input.
            $options['stdin_base64'] = base64_encode($options['stdin']);
            unset($options['stdin']);
        }
        if (is_string($taskOrCommand)) {
            return ['task' => $taskOrCommand] + $options;
        }
        $keys = array_keys($taskOrCommand);
        if ($keys !== [] && array_filter($keys, 'is_int') === []) {
            return ['http' => $taskOrCommand] + $options; // jobd checks the request, and names what is wrong in it
        }
        if ($taskOrCommand === []) {
            throw new \InvalidArgumentException('submit(): an ad-hoc command is a non-empty list of strings (argv)');
        }
        if (!array_is_list($taskOrCommand)) {
            // What array_filter() or unset() leave of a list: its keys no longer run 0, 1, 2, …
            throw new \InvalidArgumentException(
                'submit(): an argv is a list of strings, keyed 0, 1, 2, … in order (array_values() makes one); an HTTP '
                . 'request is keyed by names (url, method, …)'
            );
        }
        foreach ($taskOrCommand as $arg) {
            if (!is_string($arg)) {
                throw new \InvalidArgumentException('submit(): every element of an argv must be a string');
            }
        }
        return ['command' => $taskOrCommand] + $options;
    }

    /**
     * The job, with `tries`: its attempts, oldest first.
     *
     * @return array<string, mixed>
     */
    public function get(int $id): array
    {
        return $this->callArray('job.get', ['id' => $id]);
    }

    /**
     * Waits in the daemon until the job has finished, or `$timeout` seconds have passed (null or INF: as long as it
     * takes); returns the job as it then is: check its `state`.
     *
     * @return array<string, mixed>
     */
    public function wait(int $id, ?float $timeout = null): array
    {
        $timeout = self::waitTimeout('wait', $timeout);
        $params = ['id' => $id];
        if ($timeout !== null) {
            $params['timeout'] = $timeout;
        }
        return $this->callArray('job.wait', $params, $this->serverWaitLimit($timeout));
    }

    /**
     * Cancels a job; returns it once it is `cancelled` (a running one is stopped first).
     *
     * A running job that ignores SIGTERM is stopped by the SIGKILL after its kill_grace, which may be longer than
     * the client's timeout: the answer is waited for without limit, as jobctl cancel does.
     *
     * @throws Exception\StateException JOB_FINISHED when it has already ended
     * @return array<string, mixed>
     */
    public function cancel(int $id): array
    {
        return $this->callArray('job.cancel', ['id' => $id], INF);
    }

    /**
     * One page of a job's output, as job.output returns it: `data`, `offset`, `next_offset`, `size`,
     * `complete`, `truncated`, `attempt`. Options: stream (stdout|stderr|log), attempt, offset, limit, encoding
     * (utf-8|base64).
     *
     * @param array<string, mixed> $options
     * @return array<string, mixed>
     */
    public function output(int $id, array $options = []): array
    {
        if (!empty($options['wait'])) {
            // A waiting job.output has no bound but the attempt's end; give it no client deadline either.
            return $this->callArray('job.output', ['id' => $id] + $options, INF);
        }
        return $this->callArray('job.output', ['id' => $id] + $options);
    }

    /**
     * The whole of a stream kept for an attempt (default: stdout of the latest), as the bytes the job wrote; ''
     * for a job that has not run yet (delayed, queued, or cancelled before it started), as `jobctl log` shows it.
     *
     * Read page by page in base64: a UTF-8 page could cut a character in two at its end and get it replaced.
     *
     * @throws Exception\NotFoundException UNKNOWN_JOB for a job that does not exist, or an attempt it has not had;
     *     OUTPUT_MISSING for a stream whose file jobd wrote and that was removed since
     */
    public function outputText(int $id, string $stream = 'stdout', ?int $attempt = null): string
    {
        $bytes = '';
        $offset = 0;
        do {
            $params = ['stream' => $stream, 'offset' => $offset, 'limit' => 1024 * 1024, 'encoding' => 'base64'];
            if ($attempt !== null) {
                $params['attempt'] = $attempt;
            }
            try {
                $page = $this->output($id, $params);
            } catch (Exception\NotFoundException $e) {
                if ($attempt === null && ($e->getData()['attempts'] ?? null) === 0) {
                    return ''; // it exists, and has not run: no output yet, not a job that is not there
                }
                throw $e;
            }
            $data = base64_decode((string) $page['data'], true);
            if ($data === false) {
                throw new ProtocolException("job.output: the data of job $id is not valid base64");
            }
            $bytes .= $data;
            $next = (int) $page['next_offset'];
            if ($next <= $offset) {
                break; // nothing more to read now (jobd answered an empty page)
            }
            $offset = $next;
        } while ($offset < (int) $page['size']);
        return $bytes;
    }

    /**
     * Jobs, newest first: `jobs` and `next_before` (pass it back as `before` for the next page). Filters: state
     * (a state or a list), queue, task, context, limit (1-1000), before.
     *
     * @param array<string, mixed> $filters
     * @return array<string, mixed>
     */
    public function list(array $filters = []): array
    {
        return $this->callArray('job.list', $filters);
    }

    // -- workflows and instances ------------------------------------------------------------------------------

    /**
     * Launches an instance of `workflows/NAME.xml`; returns it once committed. Options: comment, host, user.
     *
     * @param array<string, string> $parameters the workflow's declared parameters, all of them
     * @param array<string, mixed> $options
     * @return array<string, mixed>
     */
    public function launch(string $workflow, array $parameters = [], array $options = []): array
    {
        return $this->callArray('instance.launch', ['workflow' => $workflow, 'parameters' => $parameters] + $options);
    }

    /**
     * The instance with its tree of jobs and tasks (`jobs`), or with `format` "xml", evQueue's document (`xml`).
     *
     * @return array<string, mixed>
     */
    public function getInstance(int $id, string $format = 'json'): array
    {
        return $this->callArray('instance.get', ['id' => $id, 'format' => $format]);
    }

    /**
     * Waits in the daemon until the instance has ended (`status` TERMINATED), or `$timeout` seconds have passed
     * (null or INF: as long as it takes); returns it as it then is.
     *
     * @return array<string, mixed>
     */
    public function waitInstance(int $id, ?float $timeout = null): array
    {
        $timeout = self::waitTimeout('waitInstance', $timeout);
        $params = ['id' => $id];
        if ($timeout !== null) {
            $params['timeout'] = $timeout;
        }
        return $this->callArray('instance.wait', $params, $this->serverWaitLimit($timeout));
    }

    /**
     * Instances, newest first: `instances`, `total`, `next_before`. Filters: workflow, status, errors (bool),
     * parameters, custom_attributes, limit, before.
     *
     * @param array<string, mixed> $filters
     * @return array<string, mixed>
     */
    public function listInstances(array $filters = []): array
    {
        return $this->callArray('instance.list', $filters);
    }

    /**
     * Stops an executing instance from going further (running tasks finish); returns the instance.
     *
     * @throws Exception\InvalidParamsException INVALID_PARAMS when it has already ended (docs/protocol.md)
     * @return array<string, mixed>
     */
    public function cancelInstance(int $id): array
    {
        return $this->callArray('instance.cancel', ['id' => $id]);
    }

    /**
     * A summary of an instance for a progress display, from instance.get (see InstanceProgress).
     */
    public function instanceProgress(int $id): InstanceProgress
    {
        return InstanceProgress::fromInstance($this->getInstance($id));
    }

    // -- the rest of the API ----------------------------------------------------------------------------------

    /** @return array<string, mixed> */
    public function ping(): array
    {
        return $this->callArray('ping');
    }

    /** @return array<string, mixed> daemon.status: version, counts, queues */
    public function status(): array
    {
        return $this->callArray('daemon.status');
    }

    /** @return list<array<string, mixed>> */
    public function queues(): array
    {
        return $this->callArray('queue.list')['queues'];
    }

    /** @return list<array<string, mixed>> */
    public function workflows(): array
    {
        return $this->callArray('workflow.list')['workflows'];
    }

    // -- events -----------------------------------------------------------------------------------------------

    /**
     * Subscribes this connection to events; returns the subscription id. Filters (all optional): jobs (ids) and
     * queues (names) for job events, instances (ids) and workflows (names) for instance events, types (job.state,
     * job.progress, job.log, instance.state, instance.progress). Events then arrive on this connection until it
     * is closed; read them with events() or listen(). Other calls may still be made meanwhile: events that come
     * while a reply is awaited are kept for later, in order.
     *
     * @param array<string, mixed> $filters
     */
    public function subscribe(array $filters = []): int
    {
        $this->connect();
        $result = $this->callArray('events.subscribe', $filters);
        $this->subscribed = true;
        $this->subscriptionLost = null;
        return (int) $result['subscription'];
    }

    /**
     * The events of this connection's subscriptions, as they come: each is the notification's params,
     * `['subscription' => 1, 'type' => 'job.state', 'job' => [...]]`, `['type' => 'job.progress', 'id' => 42,
     * 'progress' => 40, ...]`, `['type' => 'job.log', 'id' => 42, 'line' => '...', ...]`,
     * `['type' => 'instance.state', 'instance' => [...], 'progress' => 0, ...]` or
     * `['type' => 'instance.progress', 'id' => 7, 'progress' => 45, 'task' => [...], ...]`.
     *
     * The generator ends when no event has come for `$idleTimeout` seconds (null: it never ends by itself;
     * break out of the loop). Not reading events for long gets the connection cut by jobd (4 MiB waiting).
     *
     * @return \Generator<int, array<string, mixed>>
     */
    public function events(?float $idleTimeout = null): \Generator
    {
        if (!$this->subscribed || $this->stream === null) {
            if ($this->subscriptionLost !== null) {
                throw new ConnectionException(
                    "events(): the subscription ended with its connection, closed after \"{$this->subscriptionLost}\"; "
                    . 'subscribe() again (the next call opens a new connection)'
                );
            }
            throw new \LogicException('events(): call subscribe() first, on this same connection');
        }
        while (true) {
            while ($this->events !== []) {
                yield array_shift($this->events);
            }
            $deadline = $idleTimeout === null ? INF : microtime(true) + $idleTimeout;
            try {
                $message = $this->readMessage($deadline);
            } catch (TimeoutException) {
                return; // nothing was asked, so the stream is still in step: the connection stays usable
            }
            if (!$this->keepIfEvent($message)) {
                $this->unexpected($message);
            }
        }
    }

    /**
     * Calls `$onEvent($event)` for each event (see events()) until it returns false, or until no event has
     * come for `$idleTimeout` seconds. Returns how many events it delivered.
     *
     * @param callable(array<string, mixed>): (bool|null|void) $onEvent
     */
    public function listen(callable $onEvent, ?float $idleTimeout = null): int
    {
        $delivered = 0;
        foreach ($this->events($idleTimeout) as $event) {
            $delivered++;
            if ($onEvent($event) === false) {
                break;
            }
        }
        return $delivered;
    }

    // -- the wire ---------------------------------------------------------------------------------------------

    /**
     * Any API method: sends the request and returns its `result`.
     *
     * @param array<string, mixed> $params
     * @param float|null $timeout seconds this call may take (null: the client's timeout; INF: no limit)
     * @throws JobdException the error reply as its family's exception, or what went wrong on the way
     */
    public function call(string $method, array $params = [], ?float $timeout = null): mixed
    {
        if ($this->stream !== null) {
            $this->checkStillOpen();
        }
        $this->connect();
        $limit = $timeout ?? $this->timeout;
        $deadline = is_finite($limit) ? microtime(true) + $limit : INF;
        $id = $this->nextId++;
        $request = ['jsonrpc' => '2.0', 'id' => $id, 'method' => $method];
        if ($params !== []) {
            $request['params'] = self::asObjects($params);
        }
        try {
            $frame = json_encode(
                $request,
                JSON_THROW_ON_ERROR | JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE | JSON_PRESERVE_ZERO_FRACTION,
            );
        } catch (\JsonException $e) {
            throw new \InvalidArgumentException("$method: the parameters cannot be sent as JSON: {$e->getMessage()}");
        }
        try {
            $this->write($frame . "\n");
            $reply = $this->awaitReply($id, $deadline);
        } catch (\Throwable $e) {
            // The reply was not read: it may still come, and would be taken for the answer to the next request. So
            // start afresh, whatever ended the call: a timeout, a broken connection, a peer out of step, or an
            // exception of the application's thrown in the middle of it (a pcntl signal handler's, as a worker's
            // SIGTERM handler may throw), which may even have cut the request short.
            $this->drop($e);
            throw $e;
        }
        if (array_key_exists('error', $reply)) {
            throw ErrorMap::exception($reply['error']);
        }
        return $reply['result'];
    }

    /**
     * @param array<string, mixed> $params
     * @return array<string, mixed>
     */
    private function callArray(string $method, array $params = [], ?float $timeout = null): array
    {
        $result = $this->call($method, $params, $timeout);
        if (!is_array($result)) {
            throw new ProtocolException("$method: expected an object as result, got " . get_debug_type($result));
        }
        return $result;
    }

    /**
     * A wait's timeout as jobd takes it: INF means no limit, as it does for the client's own timeouts (JSON has no
     * infinity); NAN is refused here, with what is allowed, rather than as JSON that cannot be written.
     */
    private static function waitTimeout(string $method, ?float $timeout): ?float
    {
        if ($timeout === INF) {
            return null;
        }
        if ($timeout !== null && is_nan($timeout)) {
            throw new \InvalidArgumentException(
                "$method(): the timeout is a number of seconds >= 0, or null or INF for no limit"
            );
        }
        return $timeout;
    }

    /** The client's deadline for a server-side wait of `$timeout` seconds: the wait, plus the usual margin. */
    private function serverWaitLimit(?float $timeout): float
    {
        return $timeout === null ? INF : $timeout + $this->timeout;
    }

    /**
     * Empty arrays under the names jobd reads as objects become `{}`, at any depth (batch members, http).
     *
     * @param array<mixed> $value
     * @return array<mixed>|\stdClass
     */
    private static function asObjects(array $value): array|\stdClass
    {
        if ($value === []) {
            return new \stdClass();
        }
        foreach ($value as $key => $item) {
            if (!is_array($item)) {
                continue;
            }
            if ($item === [] && in_array($key, self::OBJECT_PARAMS, true)) {
                $value[$key] = new \stdClass();
            } elseif ($item !== []) {
                $value[$key] = self::asObjects($item);
            }
        }
        return $value;
    }

    private function write(string $data): void
    {
        $stream = $this->stream;
        assert($stream !== null);
        $length = strlen($data);
        $written = 0;
        while ($written < $length) {
            $count = @fwrite($stream, substr($data, $written));
            if ($count === false || $count === 0) {
                // jobd closes after refusing a request (FRAME_TOO_LARGE); its reply may be waiting unread.
                $this->raiseUnreadError();
                throw new ConnectionException("the connection to jobd at {$this->socketPath} broke while sending");
            }
            $written += $count;
        }
    }

    /**
     * Before a request on a connection opened earlier: if jobd has closed it meanwhile (it stopped or restarted
     * while this client was idle), drops it, so that the request goes on a new one (or fails to connect, saying
     * why) instead of breaking on the old one. Nothing was sent on it since the last reply, so nothing is lost;
     * except a subscription, which ended with it: that is an error, as its events would otherwise stop silently.
     */
    private function checkStillOpen(): void
    {
        $stream = $this->stream;
        assert($stream !== null);
        $read = [$stream];
        $write = $except = null;
        if (@stream_select($read, $write, $except, 0) !== 1) {
            return; // nothing to read: open, and idle
        }
        // Readable while no reply is awaited: events (kept, in order), or the end of the connection.
        stream_set_blocking($stream, false);
        while (is_string($chunk = @fread($stream, self::READ_CHUNK)) && $chunk !== '') {
            $this->buffer .= $chunk;
        }
        $ended = feof($stream);
        stream_set_blocking($stream, true);
        if (!$ended) {
            return;
        }
        foreach (explode("\n", $this->buffer) as $line) {
            $message = json_decode($line, true);
            if (is_array($message) && ($message['id'] ?? null) === null && isset($message['error'])) {
                $this->close(); // jobd said why it closed the connection (TOO_MANY_CONNECTIONS)
                throw ErrorMap::exception($message['error']);
            }
        }
        $subscribed = $this->subscribed;
        $this->close();
        if ($subscribed) {
            throw new ConnectionException(
                "jobd closed the connection on {$this->socketPath} (it stopped or restarted): its subscription "
                . 'ended with it; subscribe again (the next call opens a new connection)'
            );
        }
    }

    /** Raises an error reply jobd sent before closing, if one is in the receive queue. */
    private function raiseUnreadError(): void
    {
        $stream = $this->stream;
        assert($stream !== null);
        stream_set_blocking($stream, false);
        while (is_string($chunk = @fread($stream, self::READ_CHUNK)) && $chunk !== '') {
            $this->buffer .= $chunk;
        }
        foreach (explode("\n", $this->buffer) as $line) {
            $message = json_decode($line, true);
            if (is_array($message) && isset($message['error'])) {
                $this->close();
                throw ErrorMap::exception($message['error']);
            }
        }
    }

    /**
     * The reply to request `$id`: a message with its `error` or its `result`.
     *
     * @return array<mixed>
     */
    private function awaitReply(int $id, float $deadline): array
    {
        while (true) {
            $message = $this->readMessage($deadline);
            if ($this->keepIfEvent($message)) {
                continue;
            }
            if (array_key_exists('id', $message) && $message['id'] === $id) {
                if (!array_key_exists('error', $message) && !array_key_exists('result', $message)) {
                    throw new ProtocolException(
                        'reply has neither result nor error: ' . substr($this->lastMessage, 0, 200)
                    );
                }
                return $message;
            }
            $this->unexpected($message);
        }
    }

    /** @param array<mixed> $message */
    private function keepIfEvent(array $message): bool
    {
        if (($message['method'] ?? null) === 'event' && !array_key_exists('id', $message)) {
            $params = $message['params'] ?? [];
            $this->events[] = is_array($params) ? $params : [];
            return true;
        }
        return false;
    }

    /**
     * A message that is neither an event nor the awaited reply.
     *
     * @param array<mixed> $message
     */
    private function unexpected(array $message): never
    {
        if (($message['id'] ?? null) === null && isset($message['error'])) {
            // jobd could not read the request far enough to learn its id (a bad frame, a line over 1 MiB), or
            // refused the connection itself (TOO_MANY_CONNECTIONS): about us either way. It closes the
            // connection after such an error, so the next call starts on a new one.
            $this->close();
            throw ErrorMap::exception($message['error']);
        }
        throw new ProtocolException('unexpected message from jobd: ' . substr($this->lastMessage, 0, 200));
    }

    /** @return array<mixed> */
    private function readMessage(float $deadline): array
    {
        $line = $this->readLine($deadline);
        $this->lastMessage = $line;
        if (str_starts_with(ltrim($line), '<')) {
            throw new ProtocolException(
                "{$this->socketPath} speaks XML (evQueue's protocol, as jobd's evqueue_socket does), not jobd's "
                . "JSON-RPC: this client needs jobd's API socket, its [daemon] socket; it sent: "
                . substr($line, 0, 200)
            );
        }
        try {
            $message = json_decode($line, true, 512, JSON_THROW_ON_ERROR | JSON_BIGINT_AS_STRING);
        } catch (\JsonException $e) {
            throw new ProtocolException(
                "invalid JSON from {$this->socketPath} ({$e->getMessage()}): is it jobd's API socket? It sent: "
                . substr($line, 0, 200)
            );
        }
        if (!is_array($message)) {
            throw new ProtocolException("unexpected JSON value from {$this->socketPath}: " . substr($line, 0, 200));
        }
        return $message;
    }

    private function readLine(float $deadline): string
    {
        $searchFrom = 0;
        while (($end = strpos($this->buffer, "\n", $searchFrom)) === false) {
            if (strlen($this->buffer) > self::MAX_LINE) {
                $this->close();
                throw new ProtocolException('a line from jobd is longer than ' . self::MAX_LINE . ' bytes');
            }
            $searchFrom = strlen($this->buffer);
            $this->fill($deadline);
        }
        $line = substr($this->buffer, 0, $end);
        $this->buffer = substr($this->buffer, $end + 1);
        return $line;
    }

    /** Reads what has arrived, blocking in stream_select until something does or the deadline passes. */
    private function fill(float $deadline): void
    {
        $stream = $this->stream;
        if ($stream === null) {
            throw new ConnectionException("not connected to jobd at {$this->socketPath}");
        }
        while (true) {
            $read = [$stream];
            $write = $except = null;
            error_clear_last();
            if (is_finite($deadline)) {
                $left = $deadline - microtime(true);
                if ($left <= 0) {
                    throw new TimeoutException("timed out waiting for jobd at {$this->socketPath}");
                }
                $seconds = (int) floor($left);
                $ready = @stream_select($read, $write, $except, $seconds, (int) (($left - $seconds) * 1e6));
            } else {
                $ready = @stream_select($read, $write, $except, null);
            }
            if ($ready === false) {
                $error = error_get_last()['message'] ?? '';
                error_clear_last();
                if (str_contains($error, 'Interrupted')) {
                    continue; // a signal (EINTR, pcntl handlers): the deadline is checked again above
                }
                $this->close();
                throw new ConnectionException("cannot wait on the connection to {$this->socketPath}: $error");
            }
            if ($ready === 0) {
                throw new TimeoutException("timed out waiting for jobd at {$this->socketPath}");
            }
            break;
        }
        $chunk = @fread($stream, self::READ_CHUNK);
        if ($chunk === false || $chunk === '') {
            $pending = strlen($this->buffer);
            $detail = $pending > 0 ? " ($pending bytes of an unfinished line)" : '';
            $this->close();
            throw new ConnectionException("jobd closed the connection on {$this->socketPath}$detail");
        }
        $this->buffer .= $chunk;
    }
}

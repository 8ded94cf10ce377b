<?php
// A small client for jobd's HTTP listener (docs/http.md) with nothing but PHP's streams: no curl, no extension
// beyond php-cli. It speaks HTTP/1.0 (one request per connection, the body ends when jobd closes it), over TCP
// ("tcp://127.0.0.1:8080") or a unix socket ("unix:///run/jobd/http.sock", where jobd knows the PHP process by
// its peer credentials and no token is needed).

declare(strict_types=1);

final class JobdError extends RuntimeException
{
    public function __construct(public readonly string $jobdCode, string $message, public readonly int $status)
    {
        parent::__construct($message);
    }
}

final class Jobd
{
    public function __construct(
        private readonly string $endpoint,   // tcp://HOST:PORT or unix:///PATH
        private readonly ?string $token,     // the bearer token of an [http.tokens.NAME]; null on a unix socket
        private readonly float $timeout = 10.0,
    ) {
    }

    /** Calls a JSON-RPC method through POST /api/<method> and returns its result. */
    public function call(string $method, array $params = []): mixed
    {
        $body = json_encode((object) $params, JSON_THROW_ON_ERROR);
        [$status, , $stream] = $this->request('POST', '/api/' . rawurlencode($method), $body);
        $text = stream_get_contents($stream);
        fclose($stream);
        $reply = json_decode((string) $text, true);
        if (!is_array($reply)) {
            throw new JobdError('BAD_REPLY', "jobd answered $status with no JSON", $status);
        }
        if (isset($reply['error'])) {
            throw new JobdError((string) $reply['error']['code'], (string) $reply['error']['message'], $status);
        }
        return $reply['result'];
    }

    /**
     * Opens GET /events (Server-Sent Events) and returns the stream once jobd has answered: from then on nothing
     * jobd emits is missed. Read it line by line; reads time out after $idle seconds (stream_get_meta_data()
     * says `timed_out`), so the caller can send its own keep-alive.
     */
    public function events(array $query, ?string $lastEventId, float $idle)
    {
        $headers = ['Accept: text/event-stream'];
        if ($lastEventId !== null && ctype_digit($lastEventId)) {
            $headers[] = 'Last-Event-ID: ' . $lastEventId;
        }
        [$status, , $stream] = $this->request('GET', '/events?' . http_build_query($query), null, $headers);
        if ($status !== 200) {
            $reply = json_decode((string) stream_get_contents($stream), true);
            fclose($stream);
            throw new JobdError((string) ($reply['error']['code'] ?? 'HTTP_' . $status),
                (string) ($reply['error']['message'] ?? 'jobd refused the event stream'), $status);
        }
        stream_set_timeout($stream, (int) $idle, (int) (fmod($idle, 1.0) * 1e6));
        return $stream;
    }

    /** @return array{int, array<string, string>, resource} the status, the headers, the stream at the body */
    private function request(string $method, string $target, ?string $body, array $headers = []): array
    {
        $stream = @stream_socket_client($this->endpoint, $errno, $error, $this->timeout);
        if ($stream === false) {
            throw new JobdError('UNREACHABLE', "cannot connect to jobd at {$this->endpoint}: $error", 502);
        }
        stream_set_timeout($stream, (int) $this->timeout);
        $lines = ["$method $target HTTP/1.0", 'Host: jobd', 'User-Agent: jobd-example-web'];
        if ($this->token !== null && $this->token !== '') {
            $lines[] = 'Authorization: Bearer ' . $this->token;
        }
        if ($body !== null) {
            $lines[] = 'Content-Type: application/json';
            $lines[] = 'Content-Length: ' . strlen($body);
        }
        $request = implode("\r\n", array_merge($lines, $headers)) . "\r\n\r\n" . ($body ?? '');
        if (fwrite($stream, $request) !== strlen($request)) {
            fclose($stream);
            throw new JobdError('UNREACHABLE', 'jobd closed the connection', 502);
        }
        $statusLine = fgets($stream);
        if ($statusLine === false || !preg_match('#^HTTP/1\.[01] (\d{3})#', $statusLine, $match)) {
            fclose($stream);
            throw new JobdError('BAD_REPLY', 'jobd sent no HTTP answer', 502);
        }
        $received = [];
        while (($line = fgets($stream)) !== false && rtrim($line, "\r\n") !== '') {
            [$name, $value] = array_pad(explode(':', $line, 2), 2, '');
            $received[strtolower(trim($name))] = trim($value);
        }
        return [(int) $match[1], $received, $stream];
    }
}

/** The Jobd client configured by the environment php -S was started with (see README.md). */
function jobd_from_environment(): Jobd
{
    $endpoint = getenv('JOBD_HTTP') ?: 'tcp://127.0.0.1:8080';
    $token = getenv('JOBD_TOKEN');
    if ($token === false && ($file = getenv('JOBD_TOKEN_FILE'))) {
        $token = trim((string) file_get_contents($file));
    }
    return new Jobd($endpoint, $token === false ? null : $token);
}

<?php
// One Jobd\Client (contrib/php-client), driven a step at a time: a long-lived PHP process (a queue worker, a
// daemon) that keeps its client while the test does things to jobd between two calls.
//
// Usage: php jobd_client_steps.php SOCKET
// Each line on stdin is a JSON array, a public method of Jobd\Client and its arguments (["ping"],
// ["submit", ["/bin/true"], {"stdin": "x"}]); each is answered by one line on stdout, {"result": ...} or
// {"exception": class name without namespace, "wire_code": ..., "message": ...}. Ends at the end of stdin.

declare(strict_types=1);

require dirname(__DIR__, 2) . '/contrib/php-client/tests/bootstrap.php';

// A worker's signal handler may throw (to stop between two jobs, say), and so end a call in its middle: SIGUSR1's
// does so here, for the tests of what the client makes of it.
pcntl_async_signals(true);
pcntl_signal(SIGUSR1, static function (): never {
    throw new RuntimeException('interrupted by SIGUSR1');
});

$client = new Jobd\Client($argv[1]);
while (($line = fgets(STDIN)) !== false) {
    $step = json_decode($line, true, 512, JSON_THROW_ON_ERROR);
    $method = array_shift($step);
    try {
        $result = $client->$method(...$step);
        if ($result instanceof Generator) {
            $result = iterator_to_array($result, false);
        }
        $answer = ['result' => $result];
    } catch (Throwable $e) {
        $answer = [
            'exception' => substr(strrchr('\\' . $e::class, '\\'), 1),
            'wire_code' => $e instanceof Jobd\Exception\JobdException ? $e->getWireCode() : null,
            'message' => $e->getMessage(),
        ];
    }
    echo json_encode($answer, JSON_UNESCAPED_SLASHES | JSON_INVALID_UTF8_SUBSTITUTE), "\n";
}

<?php
// An evQueue client written the way evQueue's own PHP class talks to its engine: connect to the Unix socket, read
// the <ready> greeting, send one XML document per request, read until the answer's root element closes, skip the
// <ping /> keep-alives sent while a request waits, and check status="OK".
//
// Usage: php evqueue_client.php SOCKET WORKFLOW [--synchronous] [NAME=VALUE ...]
// SOCKET is a Unix socket path, or tcp://HOST:PORT for jobd's TCP listener: there the client answers evQueue's
// <auth challenge> as evQueue's class does, hash_hmac("sha1", hex2bin($challenge), sha1($password, true)), with
// the login and password from the environment variables EVQUEUE_USER and EVQUEUE_PASSWORD.
// Launches WORKFLOW with the parameters (asynchronously, then `instance wait`; or in one synchronous launch, which
// jobd answers when the instance has ended), queries the instance and prints one JSON object: the greeting's
// profile, the instance id, its status and errors, the output of each task, the keep-alives skipped, and the first
// queue of `queuepool list` as an xpathfilter selects it.
// Exit code 0 on success; 1 with a message on stderr when jobd answers an error or the conversation breaks.

declare(strict_types=1);

final class EvQueueError extends Exception
{
}

final class EvQueueClient
{
    /** @var resource */
    private $socket;
    private string $buffer = '';
    public int $keepalives = 0;
    public DOMElement $greeting;

    public function __construct(string $path, float $timeout = 30.0)
    {
        $address = str_starts_with($path, 'tcp://') ? $path : 'unix://' . $path;
        $socket = @stream_socket_client($address, $errno, $errstr, $timeout);
        if ($socket === false) {
            throw new EvQueueError("cannot connect to $path: $errstr");
        }
        stream_set_timeout($socket, (int) $timeout);
        $this->socket = $socket;
        $this->greeting = $this->readDocument();
        if ($this->greeting->tagName === 'auth') {
            $this->authenticate($this->greeting->getAttribute('challenge'));
            $this->greeting = $this->readDocument();
        }
        if ($this->greeting->getAttribute('status') === 'KO') {
            throw new EvQueueError(sprintf(
                'login: %s (%s)',
                $this->greeting->getAttribute('error'),
                $this->greeting->getAttribute('error-code')
            ));
        }
        if ($this->greeting->tagName !== 'ready' || $this->greeting->getAttribute('status') !== 'OK') {
            throw new EvQueueError('expected a <ready> greeting, got <' . $this->greeting->tagName . '>');
        }
    }

    /** Send a request; return the answer's root element, skipping keep-alives. */
    public function api(string $group, array $attributes = [], array $parameters = []): DOMElement
    {
        $request = new DOMDocument('1.0', 'utf-8');
        $root = $request->createElement($group);
        foreach ($attributes as $name => $value) {
            $root->setAttribute($name, (string) $value);
        }
        foreach ($parameters as $name => $value) {
            $parameter = $request->createElement('parameter');
            $parameter->setAttribute('name', (string) $name);
            $parameter->setAttribute('value', (string) $value);
            $root->appendChild($parameter);
        }
        $request->appendChild($root);
        $this->write($request->saveXML());  // with its XML declaration, as evQueue's class sends it

        do {
            $answer = $this->readDocument();
            if ($answer->tagName === 'ping') {
                $this->keepalives++;
            }
        } while ($answer->tagName === 'ping');
        if ($answer->getAttribute('status') !== 'OK') {
            throw new EvQueueError(sprintf(
                '%s %s: %s (%s)',
                $group,
                $attributes['action'] ?? '',
                $answer->getAttribute('error'),
                $answer->getAttribute('error-code')
            ));
        }
        return $answer;
    }

    /** evQueue's challenge / response: HMAC-SHA1 keyed with SHA1(password), over the challenge's 20 bytes. */
    private function authenticate(string $challenge): void
    {
        $user = (string) getenv('EVQUEUE_USER');
        $response = hash_hmac('sha1', hex2bin($challenge), sha1((string) getenv('EVQUEUE_PASSWORD'), true));
        $auth = new DOMDocument('1.0', 'utf-8');
        $root = $auth->createElement('auth');
        $root->setAttribute('response', $response);
        $root->setAttribute('user', $user);
        $auth->appendChild($root);
        $this->write($auth->saveXML());
    }

    /** <quit/>: jobd closes the connection without an answer. */
    public function quit(): void
    {
        $this->write('<quit/>');
        $rest = stream_get_contents($this->socket);
        fclose($this->socket);
        if ($this->buffer !== '' || ($rest !== false && trim($rest) !== '')) {
            throw new EvQueueError('an answer to <quit/>: ' . $this->buffer . $rest);
        }
    }

    private function write(string $data): void
    {
        while ($data !== '') {
            $written = fwrite($this->socket, $data);
            if ($written === false || $written === 0) {
                throw new EvQueueError('the connection broke while sending');
            }
            $data = substr($data, $written);
        }
    }

    /** Read until one document's root element has closed; return that root. */
    private function readDocument(): DOMElement
    {
        while (($end = self::documentEnd($this->buffer)) === null) {
            $chunk = fread($this->socket, 65536);
            if ($chunk === false || $chunk === '') {
                $meta = stream_get_meta_data($this->socket);
                throw new EvQueueError($meta['timed_out'] ? 'no answer in time' : 'jobd closed the connection');
            }
            $this->buffer .= $chunk;
        }
        $document = substr($this->buffer, 0, $end);
        $this->buffer = ltrim(substr($this->buffer, $end));  // the newline after each answer
        $dom = new DOMDocument();
        if (!$dom->loadXML($document, LIBXML_NONET)) {
            throw new EvQueueError('ill-formed answer: ' . substr($document, 0, 200));
        }
        return $dom->documentElement;
    }

    /** Where the first complete element of $buffer ends, or null while it is incomplete. */
    private static function documentEnd(string $buffer): ?int
    {
        $depth = 0;
        $started = false;
        $length = strlen($buffer);
        for ($i = 0; $i < $length; $i++) {
            if ($buffer[$i] !== '<') {
                continue;
            }
            // Comments, processing instructions and CDATA (an instance document may carry the workflow's
            // comments) open no element.
            foreach (['<!--' => '-->', '<?' => '?>', '<![CDATA[' => ']]>'] as $opening => $closing) {
                if (substr_compare($buffer, $opening, $i, strlen($opening)) === 0) {
                    $found = strpos($buffer, $closing, $i + strlen($opening));
                    if ($found === false) {
                        return null;
                    }
                    $i = $found + strlen($closing) - 1;
                    continue 2;
                }
            }
            $close = $i + 1 < $length && $buffer[$i + 1] === '/';
            $quote = null;
            for ($j = $i + 1; $j < $length; $j++) {
                $byte = $buffer[$j];
                if ($quote !== null) {
                    if ($byte === $quote) {
                        $quote = null;
                    }
                } elseif ($byte === '"' || $byte === "'") {
                    $quote = $byte;
                } elseif ($byte === '>') {
                    break;
                }
            }
            if ($j >= $length) {
                return null;  // the tag is not complete yet
            }
            $started = true;
            if ($close) {
                $depth--;
            } elseif ($buffer[$j - 1] !== '/') {
                $depth++;
            }
            if ($started && $depth === 0) {
                return $j + 1;
            }
            $i = $j;
        }
        return null;
    }
}

if ($argc < 3) {
    fwrite(STDERR, "usage: php evqueue_client.php SOCKET WORKFLOW [--synchronous] [NAME=VALUE ...]\n");
    exit(2);
}
$rest = array_slice($argv, 3);
$synchronous = ($rest[0] ?? '') === '--synchronous';
if ($synchronous) {
    array_shift($rest);
}
$parameters = [];
foreach ($rest as $pair) {
    [$name, $value] = explode('=', $pair, 2) + [1 => ''];
    $parameters[$name] = $value;
}

try {
    $client = new EvQueueClient($argv[1]);
    $pong = $client->api('ping');
    $launch = ['action' => 'launch', 'name' => $argv[2], 'comment' => 'from PHP'];
    if ($synchronous) {
        $launch += ['mode' => 'synchronous', 'timeout' => 60];
    }
    $launched = $client->api('instance', $launch, $parameters);
    $id = (int) $launched->getAttribute('workflow-instance-id');
    if ($launched->getAttribute('wait') === 'timedout') {
        throw new EvQueueError("instance $id did not end within 60 seconds");
    }
    if (!$synchronous) {
        $client->api('instance', ['action' => 'wait', 'id' => $id, 'timeout' => 60]);
    }
    $answer = $client->api('instance', ['action' => 'query', 'id' => $id]);
    $workflow = $answer->getElementsByTagName('workflow')->item(0);
    $xpath = new DOMXPath($workflow->ownerDocument);
    $outputs = [];
    foreach ($xpath->query('.//task', $workflow) as $task) {
        $output = $xpath->query('output', $task)->item(0);
        $outputs[] = [
            'name' => $task->getAttribute('name'),
            'status' => $task->getAttribute('status'),
            'retval' => $task->getAttribute('retval'),
            'output' => $output === null ? null : $output->textContent,
        ];
    }
    // evQueue's xpathfilter: the answer is a <response status="OK"> holding what the expression selects, checked
    // as any answer.
    $filtered = $client->api('queuepool', ['action' => 'list', 'xpathfilter' => '/response/queue[1]']);
    $firstQueue = $filtered->getElementsByTagName('queue')->item(0);
    $client->quit();
    echo json_encode([
        'profile' => $client->greeting->getAttribute('profile'),
        'version' => $pong->getAttribute('version'),
        'id' => $id,
        'status' => $workflow->getAttribute('status'),
        'errors' => (int) $workflow->getAttribute('errors'),
        'comment' => $workflow->getAttribute('comment'),
        'tasks' => $outputs,
        'keepalives' => $client->keepalives,
        'first_queue' => $firstQueue === null ? null : $firstQueue->getAttribute('name'),
    ], JSON_PRETTY_PRINT | JSON_UNESCAPED_SLASHES), "\n";
} catch (EvQueueError $error) {
    fwrite(STDERR, 'evqueue_client.php: ' . $error->getMessage() . "\n");
    exit(1);
}

<?php
// A scripted evQueue conversation, held the way evQueue's PHP class holds one: connect, read the greeting (answering
// an <auth challenge> with HMAC-SHA1 keyed with SHA1(password) when a login is given), then for each request send
// one document with its XML declaration and read the answer with PHP's expat parser, fed as bytes arrive, until the
// answer's root element closes; <ping /> keep-alives are skipped.
//
// Usage: php evqueue_requests.php ADDRESS < SCRIPT.json
// ADDRESS is a Unix socket path, or tcp://HOST:PORT. SCRIPT is a JSON object:
//   {"user": "admin", "password": "admin",                 (optional: the login for an <auth challenge>)
//    "requests": [{"group": "ping"},
//                 {"group": "instance", "attributes": {"action": "query", "id": "1"}, "parameters": {"n": "3"}},
//                 {"raw": "<ping>"}, ...]}                (raw: bytes sent as they are)
// Without a login the requests go out right after the greeting, whatever it is (a client that does not log in).
// Prints one JSON object: the greeting, each answer ({"root", "attributes", "text"}), how many keep-alives were
// skipped, and "closed": whether jobd had closed the connection when the script ended (a last <ping/> is not
// answered) or when an answer was awaited (the answers then stop there). Exit code 0 unless the conversation could not be held at all.

declare(strict_types=1);

final class ConversationEnded extends Exception
{
}

final class EvQueueConversation
{
    /** @var resource */
    private $socket;
    /** Bytes read past the end of the last answer (the start of the next one). */
    private string $unread = '';
    public int $keepalives = 0;

    public function __construct(string $address)
    {
        $target = str_starts_with($address, 'tcp://') ? $address : 'unix://' . $address;
        $socket = @stream_socket_client($target, $errno, $errstr, 10);
        if ($socket === false) {
            throw new RuntimeException("cannot connect to $address: $errstr");
        }
        stream_set_timeout($socket, 60);
        $this->socket = $socket;
    }

    /** The greeting, after the login when the server asks for one and a login is given. */
    public function greet(?string $user, ?string $password): array
    {
        $greeting = $this->readAnswer();
        if ($greeting['root'] === 'auth' && $user !== null) {
            $challenge = hex2bin($greeting['attributes']['challenge'] ?? '');
            $response = hash_hmac('sha1', (string) $challenge, sha1((string) $password, true));
            $auth = new DOMDocument('1.0', 'utf-8');
            $element = $auth->createElement('auth');
            $element->setAttribute('response', $response);
            $element->setAttribute('user', $user);
            $auth->appendChild($element);
            $this->send($auth->saveXML());
            $greeting = $this->readAnswer();
        }
        return $greeting;
    }

    /** @param array{group?: string, attributes?: array<string, string>, parameters?: array<string, string>, raw?: string} $request */
    public function ask(array $request): array
    {
        if (isset($request['raw'])) {
            $this->send($request['raw']);
        } else {
            $document = new DOMDocument('1.0', 'utf-8');
            $root = $document->createElement($request['group']);
            foreach ($request['attributes'] ?? [] as $name => $value) {
                $root->setAttribute((string) $name, (string) $value);
            }
            foreach ($request['parameters'] ?? [] as $name => $value) {
                $parameter = $document->createElement('parameter');
                $parameter->setAttribute('name', (string) $name);
                $parameter->setAttribute('value', (string) $value);
                $root->appendChild($parameter);
            }
            $document->appendChild($root);
            $this->send($document->saveXML());
        }
        do {
            $answer = $this->readAnswer();
            $keepalive = $answer['root'] === 'ping';
            $this->keepalives += $keepalive ? 1 : 0;
        } while ($keepalive);
        return $answer;
    }

    /** Whether the connection is still open: a <ping/> is answered, or the server has closed it. */
    public function stillOpen(): bool
    {
        try {
            $this->ask(['group' => 'ping']);
            return true;
        } catch (ConversationEnded) {
            return false;
        }
    }

    private function send(string $data): void
    {
        while ($data !== '') {
            $written = @fwrite($this->socket, $data);
            if ($written === false || $written === 0) {
                throw new ConversationEnded('the connection broke while sending');
            }
            $data = substr($data, $written);
        }
    }

    /** One answer: bytes go to a new expat parser until its root element has closed. */
    private function readAnswer(): array
    {
        $parser = xml_parser_create('UTF-8');
        xml_parser_set_option($parser, XML_OPTION_CASE_FOLDING, 0);
        $depth = 0;
        $root = null;
        $attributes = [];
        $text = '';
        $closed = false;
        xml_set_element_handler(
            $parser,
            static function ($parser, string $name, array $attrs) use (&$depth, &$root, &$attributes): void {
                if ($depth === 0) {
                    $root = $name;
                    $attributes = $attrs;
                }
                $depth++;
            },
            static function ($parser, string $name) use (&$depth, &$closed): void {
                $depth--;
                $closed = $closed || $depth === 0;
            },
        );
        xml_set_character_data_handler($parser, static function ($parser, string $data) use (&$depth, &$text): void {
            if ($depth === 1) {
                $text .= $data;
            }
        });
        while (!$closed) {
            if ($this->unread === '') {
                $chunk = fread($this->socket, 65536);
                if ($chunk === false || $chunk === '') {
                    $meta = stream_get_meta_data($this->socket);
                    throw new ConversationEnded($meta['timed_out'] ? 'no answer in time' : 'the server closed the connection');
                }
                $this->unread = $chunk;
            }
            // One byte at a time through the parser until the root closes: what follows belongs to the next answer.
            $length = strlen($this->unread);
            for ($i = 0; $i < $length && !$closed; $i++) {
                if (!xml_parse($parser, $this->unread[$i], false)) {
                    throw new RuntimeException('ill-formed answer: ' . xml_error_string(xml_get_error_code($parser)));
                }
            }
            $this->unread = ltrim(substr($this->unread, $i), "\n");
        }
        return ['root' => $root, 'attributes' => $attributes, 'text' => $text];
    }
}

$script = json_decode((string) stream_get_contents(STDIN), true, 512, JSON_THROW_ON_ERROR);
$conversation = new EvQueueConversation($argv[1]);
$report = ['greeting' => null, 'answers' => [], 'keepalives' => 0, 'closed' => false];
try {
    $report['greeting'] = $conversation->greet($script['user'] ?? null, $script['password'] ?? null);
    foreach ($script['requests'] as $request) {
        $report['answers'][] = $conversation->ask($request);
    }
    $report['closed'] = !$conversation->stillOpen();
} catch (ConversationEnded) {
    $report['closed'] = true;
}
$report['keepalives'] = $conversation->keepalives;
echo json_encode($report, JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE | JSON_INVALID_UTF8_SUBSTITUTE), "\n";

<?php

declare(strict_types=1);

// AJAX progress of a workflow instance.
//
//   POST progress.php                  form field "source": launches the workflow `thumbnails` with it,
//                                      answers 202 {"instance": ID}
//   GET  progress.php?instance=ID      {"id", "workflow", "status", "finished", "errors", "percent", "tasks": [...],
//                                      "token"}
//   GET  ...&since=TOKEN               long polling: while the progress is still what TOKEN describes, the answer
//                                      waits (at most 20 s) for jobd's next event about the instance
//
// The browser asks again with the last token as soon as an answer arrives: it sees every change at once, and
// neither it nor this script ever sleeps or polls on a timer.

require __DIR__ . '/bootstrap.php';

use Jobd\Client;
use Jobd\Exception\ConnectionException;
use Jobd\Exception\InvalidParamsException;
use Jobd\Exception\NotFoundException;
use Jobd\Exception\UnavailableException;
use Jobd\InstanceProgress;

const WORKFLOW = 'thumbnails';
const HOLD = 20.0;

session_start();
$mine = $_SESSION['instances'] ?? [];

$jobd = new Client();

try {
    if ($_SERVER['REQUEST_METHOD'] === 'POST') {
        $source = $_POST['source'] ?? '';
        if (!is_string($source) || $source === '') {
            reply(400, ['error' => 'give the form field "source"']);
        }
        $instance = $jobd->launch(WORKFLOW, ['source' => $source], ['comment' => 'web upload']);
        $_SESSION['instances'] = [...$mine, $instance['id']];
        reply(202, ['instance' => $instance['id']]);
    }
    session_write_close();

    $id = filter_input(INPUT_GET, 'instance', FILTER_VALIDATE_INT, ['options' => ['min_range' => 1]]);
    if (!is_int($id) || !in_array($id, $mine, true)) {
        reply(404, ['error' => 'no such instance']);
    }
    $since = $_GET['since'] ?? null;
    if (is_string($since) && $since !== '') {
        // Subscribed before reading the instance: a change made after that read arrives as an event.
        $jobd->subscribe(['instances' => [$id]]);
    }
    $progress = $jobd->instanceProgress($id);
    if ($since === token($progress) && !$progress->isFinished()) {
        // instance.state or instance.progress (a task queued, started, progressed, ended): read it afresh.
        $jobd->listen(static fn (array $event): bool => false, HOLD); // false: the first event is enough
        $progress = $jobd->instanceProgress($id);
    }
    reply(200, $progress->toArray() + ['token' => token($progress)]);
} catch (NotFoundException) {
    reply(404, ['error' => 'no such instance']);
} catch (InvalidParamsException $e) {
    reply(400, ['error' => $e->getMessage()]);
} catch (ConnectionException | UnavailableException $e) {
    error_log("progress.php: {$e->getMessage()}");
    reply(503, ['error' => 'the service is unavailable, try again later']);
}

/** What the page has seen, in a word: equal tokens, equal progress. */
function token(InstanceProgress $progress): string
{
    return hash('sha256', (string) json_encode($progress->toArray()));
}

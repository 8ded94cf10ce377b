<?php
// Server-Sent Events for one instance of this session, relayed from jobd's GET /events: the browser never sees the
// token, and may only watch what it launched. The stream is
//   event: snapshot        the instance as instance.get gives it (its tree of jobs and tasks); no id
//   event: tasks           the same, again, whenever a task appears that the last tree did not have (a job's
//                          tasks are numbered when the job starts): for its rows only, as it may be newer than
//                          the events still to come (a snapshot that said TERMINATED ended the page there, the
//                          last step's progress unshown)
//   id: N / event: instance.progress | instance.state   jobd's events, ids and all, as jobd sent them
// A snapshot comes first. The browser's EventSource reconnects by itself with Last-Event-ID, passed on to
// jobd, which replays what was missed. The stream ends after the instance's end (instance.state TERMINATED).
//
// php -S serves one request at a time unless PHP_CLI_SERVER_WORKERS is set: this request lasts as long as the
// instance runs, so start the server with workers (see README.md), one per page watched at once, plus one.

declare(strict_types=1);

require_once __DIR__ . '/../lib/app.php';

const KEEPALIVE = 15.0;   // seconds of silence before a comment goes out (and a closed browser is noticed)

start_session();
$id = requested_instance();
session_write_close();   // the session file stays locked until then: other requests of this browser would wait
if ($id === null) {
    http_response_code(404);
    exit;
}

header('Content-Type: text/event-stream');
header('Cache-Control: no-cache');
header('X-Accel-Buffering: no');   // for a buffering proxy in front, were there one
while (ob_get_level() > 0) {
    ob_end_flush();
}
set_time_limit(0);

function send(string $text): void
{
    echo $text;
    flush();   // the browser gets it now; if it has gone, PHP ends this script here
}

function send_snapshot(array $instance, string $event = 'snapshot'): array
{
    send("event: $event\n" . 'data: ' . json_encode($instance, JSON_THROW_ON_ERROR) . "\n\n");
    $known = [];
    $walk = function (array $jobs) use (&$walk, &$known): void {
        foreach ($jobs as $job) {
            foreach ($job['tasks'] as $task) {
                $known[$task['evqid']] = true;
            }
            $walk($job['subjobs']);
        }
    };
    $walk($instance['jobs']);
    return $known;
}

$jobd = jobd_from_environment();
try {
    // Subscribe first, then read the instance: a change in between comes as an event, after the snapshot.
    $events = $jobd->events(
        ['instances' => $id, 'types' => 'instance.state,instance.progress'],
        $_SERVER['HTTP_LAST_EVENT_ID'] ?? null,
        KEEPALIVE,
    );
    $snapshot = $jobd->call('instance.get', ['id' => $id]);
} catch (JobdError $failure) {
    send("retry: 5000\nevent: failure\ndata: " . json_encode($failure->getMessage()) . "\n\n");
    exit;
}
send("retry: 2000\n\n");
$known = send_snapshot($snapshot);
if ($snapshot['status'] === 'TERMINATED') {
    exit;   // everything is in the snapshot
}

$block = '';   // the lines of the event being read
$partial = '';
while (true) {
    $line = fgets($events);
    if ($line === false) {
        if (!feof($events) && stream_get_meta_data($events)['timed_out']) {
            send(": keep-alive\n\n");
            continue;
        }
        exit;   // jobd closed the stream (it stopped): the browser reconnects, and gets a new snapshot
    }
    $line = $partial . $line;
    $partial = '';
    if (!str_ends_with($line, "\n")) {
        $partial = $line;   // cut by the read timeout
        continue;
    }
    $block .= $line;
    if ($line !== "\n") {
        continue;
    }
    send($block);
    $type = preg_match('/^event: (.*)$/m', $block, $m) ? $m[1] : null;
    $data = preg_match('/^data: (.*)$/m', $block, $m) ? json_decode($m[1], true) : null;
    $block = '';
    if ($type === 'instance.state' && ($data['instance']['status'] ?? '') === 'TERMINATED') {
        exit;
    }
    if ($type === 'instance.progress' && !isset($known[$data['task']['evqid'] ?? 0])) {
        try {
            $known = send_snapshot($jobd->call('instance.get', ['id' => $id]), 'tasks');
        } catch (JobdError) {
            exit;   // the browser reconnects
        }
    }
}

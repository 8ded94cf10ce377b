<?php

declare(strict_types=1);

// A thumbnail made in the background for an upload from a web page.
//
//   POST thumbnail.php            multipart form, field "image": stores the upload, submits the task `thumbnail`
//                                 of jobd.toml, answers 202 {"job": ID, "state": "queued"}
//   GET  thumbnail.php?job=ID     the job's state and progress; with &wait=S (at most 25), the answer waits in
//                                 jobd until the job has ended or S seconds have passed: no polling loop
//
// Every visitor gets a random owner token in its session and the jobs it submits carry it as their context: a
// visitor can read only its own jobs.

require __DIR__ . '/bootstrap.php';

use Jobd\Client;
use Jobd\Exception\ConnectionException;
use Jobd\Exception\NotFoundException;
use Jobd\Exception\UnavailableException;

const SPOOL = '/tmp/thumbnails';
const MAX_WAIT = 25.0;

session_start();
$owner = $_SESSION['owner'] ??= bin2hex(random_bytes(8));
session_write_close(); // a waiting request must not hold the session lock of the visitor's other requests

$jobd = new Client(); // $JOBD_SOCKET, else /run/jobd/jobd.sock

try {
    if ($_SERVER['REQUEST_METHOD'] === 'POST') {
        $upload = $_FILES['image'] ?? null;
        if (!is_array($upload) || $upload['error'] !== UPLOAD_ERR_OK) {
            reply(400, ['error' => 'send an image in the form field "image"']);
        }
        if (!is_dir(SPOOL) && !mkdir(SPOOL, 0o750, true) && !is_dir(SPOOL)) {
            reply(500, ['error' => 'cannot store the upload']);
        }
        $source = SPOOL . '/' . bin2hex(random_bytes(12)) . '.upload';
        if (!move_uploaded_file($upload['tmp_name'], $source)) {
            reply(500, ['error' => 'cannot store the upload']);
        }
        // The reply comes once jobd has committed the job: from here on it survives a crash of jobd.
        $job = $jobd->submit('thumbnail', [
            'params' => ['SOURCE' => $source, 'SIZE' => '256'],
            'context' => "web-$owner",
        ]);
        reply(202, ['job' => $job['id'], 'state' => $job['state']]);
    }

    $id = filter_input(INPUT_GET, 'job', FILTER_VALIDATE_INT, ['options' => ['min_range' => 1]]);
    if (!is_int($id)) {
        reply(400, ['error' => 'give ?job=ID']);
    }
    $wait = filter_input(INPUT_GET, 'wait', FILTER_VALIDATE_FLOAT);
    $job = $jobd->get($id);
    if ($job['context'] !== "web-$owner") {
        reply(404, ['error' => 'no such job']); // another visitor's job: answered as a missing one, not even its existence is told
    }
    if (is_float($wait) && $wait > 0) {
        $job = $jobd->wait($id, min($wait, MAX_WAIT));
    }
    $body = ['job' => $id, 'state' => $job['state'], 'progress' => $job['progress']];
    if ($job['state'] === 'succeeded') {
        $body['thumbnail'] = trim($jobd->outputText($id)); // the task prints where it wrote the thumbnail
    } elseif (in_array($job['state'], ['failed', 'timed_out', 'cancelled'], true)) {
        $body['error'] = 'the thumbnail could not be made';
    }
    reply(200, $body);
} catch (NotFoundException) {
    reply(404, ['error' => 'no such job']);
} catch (ConnectionException | UnavailableException $e) {
    error_log("thumbnail.php: {$e->getMessage()}"); // the details are for the administrator
    reply(503, ['error' => 'the thumbnail service is unavailable, try again later']);
}

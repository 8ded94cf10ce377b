<?php
// The example page: a form that launches the `thumbnails` workflow, and the instance's live progress.
// POST / launches and redirects to /?instance=ID (the id is in the URL, and in the session, which says whose it is);
// progress.js follows it through events.php, which relays jobd's GET /events.

declare(strict_types=1);

require_once __DIR__ . '/../lib/app.php';

start_session();
$error = null;

if ($_SERVER['REQUEST_METHOD'] === 'POST') {
    $image = trim((string) ($_POST['image'] ?? ''));
    $pace = (string) ($_POST['pace'] ?? '');
    if (!hash_equals($_SESSION['csrf'], (string) ($_POST['csrf'] ?? ''))) {
        http_response_code(400);
        $error = 'The form expired: please send it again.';
    } elseif (!preg_match('/^[\w .-]{1,100}$/u', $image)) {
        http_response_code(400);
        $error = 'The image name must be 1 to 100 letters, digits, spaces, dots, dashes or underscores.';
    } elseif (!is_numeric($pace) || (float) $pace < 0 || (float) $pace > 5) {
        http_response_code(400);
        $error = 'The pace is a number of seconds from 0 to 5.';
    } else {
        try {
            $instance = jobd_from_environment()->call('instance.launch', [
                'workflow' => WORKFLOW,
                'parameters' => ['image' => $image, 'pace' => (string) (float) $pace],
                'comment' => 'launched from the example page',
            ]);
            remember_instance((int) $instance['id']);
            header('Location: ?instance=' . (int) $instance['id'], true, 303);
            exit;
        } catch (JobdError $failure) {
            http_response_code(502);
            $error = "jobd refused to launch the workflow: {$failure->jobdCode}: {$failure->getMessage()}";
        }
    }
}

$watched = requested_instance();
if (isset($_GET['instance']) && $watched === null) {
    http_response_code(404);
    $error = 'No such instance among the ones launched from this browser.';
}
?>
<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title><?= $watched === null ? 'Thumbnails' : 'Thumbnails: instance ' . $watched ?></title>
  <link rel="stylesheet" href="style.css">
</head>
<body>
<h1>Thumbnails <small>a jobd workflow</small></h1>

<?php if ($error !== null): ?>
  <p class="error" id="error"><?= h($error) ?></p>
<?php endif ?>

<?php if ($watched !== null): ?>
  <section id="instance" data-instance="<?= $watched ?>">
    <h2>Instance <?= $watched ?>: <output id="status" data-status="">connecting…</output></h2>
    <p><progress id="bar" max="100" value="0"></progress> <output id="percent">0%</output></p>
    <table>
      <thead><tr><th>step</th><th>status</th><th>progress</th><th>exit code</th></tr></thead>
      <tbody id="steps"></tbody>
    </table>
    <h3>Events</h3>
    <ol id="events"></ol>
    <p><a href="./">Launch another</a></p>
  </section>
  <script src="progress.js"></script>
<?php else: ?>
  <form method="post" action="./" id="launch">
    <input type="hidden" name="csrf" value="<?= h($_SESSION['csrf']) ?>">
    <p><label>Image <input name="image" id="image" required maxlength="100" value="holiday.jpg"></label></p>
    <p><label>Seconds per quarter of each step
      <input name="pace" id="pace" type="number" min="0" max="5" step="0.05" value="0.5"></label></p>
    <p><button type="submit" id="submit">Make thumbnails</button></p>
  </form>
  <?php if (my_instances()): ?>
    <h2>Launched from this browser</h2>
    <ul>
      <?php foreach (my_instances() as $id): ?>
        <li><a href="?instance=<?= $id ?>">instance <?= $id ?></a></li>
      <?php endforeach ?>
    </ul>
  <?php endif ?>
<?php endif ?>
</body>
</html>

<?php
// What index.php and events.php share: the session (which instances this browser launched) and output helpers.

declare(strict_types=1);

require_once __DIR__ . '/jobd.php';

const WORKFLOW = 'thumbnails';
const KEPT_INSTANCES = 20;   // the instances a session remembers (and may watch)

function start_session(): void
{
    session_start([
        'cookie_httponly' => true,
        'cookie_samesite' => 'Strict',
        'use_strict_mode' => true,
    ]);
    if (!isset($_SESSION['csrf'])) {
        $_SESSION['csrf'] = bin2hex(random_bytes(16));
    }
    $_SESSION['instances'] ??= [];
}

/** The instances this session launched, newest first: the only ones its pages may show. */
function my_instances(): array
{
    return array_values(array_filter($_SESSION['instances'] ?? [], 'is_int'));
}

function remember_instance(int $id): void
{
    $_SESSION['instances'] = array_slice([$id, ...my_instances()], 0, KEPT_INSTANCES);
}

/** The `instance` query parameter, if it is one of this session's instances. */
function requested_instance(): ?int
{
    $id = filter_var($_GET['instance'] ?? null, FILTER_VALIDATE_INT, ['options' => ['min_range' => 1]]);
    return ($id !== false && in_array($id, my_instances(), true)) ? $id : null;
}

function h(mixed $text): string
{
    return htmlspecialchars((string) $text, ENT_QUOTES | ENT_SUBSTITUTE, 'UTF-8');
}

<?php

declare(strict_types=1);

// In an application this is `require __DIR__ . '/vendor/autoload.php';` after `composer require jobd/client`.
// Run from the package's source tree (php -S, see the README), the examples use the autoloader of its tests.
$autoload = __DIR__ . '/../vendor/autoload.php';
require is_file($autoload) ? $autoload : __DIR__ . '/../tests/bootstrap.php';

/**
 * Ends the request with a JSON body.
 *
 * @param array<string, mixed> $body
 */
function reply(int $status, array $body): never
{
    http_response_code($status);
    header('Content-Type: application/json');
    header('Cache-Control: no-store');
    echo json_encode($body, JSON_UNESCAPED_SLASHES), "\n";
    exit;
}

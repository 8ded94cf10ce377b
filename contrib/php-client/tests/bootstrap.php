<?php

declare(strict_types=1);

// The tests run without `composer install` (the build has no Packagist): this maps the package's PSR-4 prefix
// to src/ as Composer's autoloader would, and loads the Debian phpunit's own autoloader when run by `php` alone.

spl_autoload_register(static function (string $class): void {
    $prefix = 'Jobd\\';
    if (!str_starts_with($class, $prefix)) {
        return;
    }
    $relative = substr($class, strlen($prefix));
    if (str_starts_with($relative, 'Tests\\')) {
        $path = __DIR__ . '/' . str_replace('\\', '/', substr($relative, strlen('Tests\\'))) . '.php';
    } else {
        $path = dirname(__DIR__) . '/src/' . str_replace('\\', '/', $relative) . '.php';
    }
    if (is_file($path)) {
        require $path;
    }
});

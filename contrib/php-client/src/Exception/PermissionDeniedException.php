<?php

declare(strict_types=1);

namespace Jobd\Exception;

/**
 * The socket exists but this process may not connect to it (EACCES): the web server's user is usually not in
 * jobd's group (the socket is mode 0660, group jobd).
 */
class PermissionDeniedException extends ConnectionException
{
}

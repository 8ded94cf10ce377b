<?php

declare(strict_types=1);

namespace Jobd\Exception;

/**
 * The socket could not be reached, or the connection broke or was closed before the reply came.
 */
class ConnectionException extends JobdException
{
}

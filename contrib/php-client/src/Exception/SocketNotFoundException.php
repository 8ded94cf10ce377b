<?php

declare(strict_types=1);

namespace Jobd\Exception;

/**
 * Nothing listens at the socket path: the file is missing (ENOENT), it is a stale socket (ECONNREFUSED), or it is
 * no socket at all (a regular file or a directory, which the message says). Is jobd running, and is the path right?
 */
class SocketNotFoundException extends ConnectionException
{
}

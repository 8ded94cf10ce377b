<?php

declare(strict_types=1);

namespace Jobd\Exception;

/**
 * Nothing listens at the socket path: the file is missing (ENOENT), or it is a stale socket (ECONNREFUSED). Is
 * jobd running, and is the path right?
 */
class SocketNotFoundException extends ConnectionException
{
}

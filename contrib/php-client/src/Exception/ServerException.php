<?php

declare(strict_types=1);

namespace Jobd\Exception;

/**
 * A bug in jobd (INTERNAL_ERROR; the daemon logged it and kept running), a server-side time limit (TIMED_OUT),
 * or an error code this client does not know.
 */
class ServerException extends RemoteException
{
}

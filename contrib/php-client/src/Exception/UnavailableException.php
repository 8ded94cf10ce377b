<?php

declare(strict_types=1);

namespace Jobd\Exception;

/**
 * jobd takes no new work from this client now: SHUTTING_DOWN, or TOO_MANY_CONNECTIONS (data.limit); worth
 * retrying later.
 */
class UnavailableException extends RemoteException
{
}

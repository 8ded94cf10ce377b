<?php

declare(strict_types=1);

namespace Jobd\Exception;

/**
 * jobd takes no new work from this client now: SHUTTING_DOWN, TOO_MANY_CONNECTIONS (data.limit), or STORE_FAILED
 * (it could not write its database: a full disk); worth retrying later.
 */
class UnavailableException extends RemoteException
{
}

<?php

declare(strict_types=1);

namespace Jobd\Exception;

/**
 * An error reply from jobd. Its family subclasses below are what callers catch; an error code this client does
 * not know yet (a newer jobd) arrives as a ServerException with its wire code.
 */
class RemoteException extends JobdException
{
}

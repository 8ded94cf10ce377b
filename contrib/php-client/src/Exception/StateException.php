<?php

declare(strict_types=1);

namespace Jobd\Exception;

/**
 * The target's state forbids the request: QUEUE_CLOSED (the queue was removed from the configuration and only
 * drains), JOB_FINISHED (cancelling a job that has already ended).
 */
class StateException extends RemoteException
{
}

<?php

declare(strict_types=1);

namespace Jobd\Exception;

/**
 * What the request names does not exist: UNKNOWN_QUEUE, UNKNOWN_TASK, UNKNOWN_JOB, UNKNOWN_WORKFLOW,
 * UNKNOWN_INSTANCE, UNKNOWN_SCHEDULE; or no longer does: OUTPUT_MISSING (an output file jobd wrote was removed).
 * data.allowed lists the names that do, where jobd may tell.
 */
class NotFoundException extends RemoteException
{
}

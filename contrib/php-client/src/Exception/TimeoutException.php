<?php

declare(strict_types=1);

namespace Jobd\Exception;

/**
 * This client's own deadline passed before jobd answered; the connection is closed (a late reply would
 * otherwise be read as the answer to a later request). Server-side waits (wait(), waitInstance()) are bounded
 * by the timeout given to them, not by this.
 */
class TimeoutException extends JobdException
{
}

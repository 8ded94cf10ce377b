<?php

declare(strict_types=1);

namespace Jobd\Exception;

/**
 * jobd could not read the request: PARSE_ERROR, INVALID_REQUEST, FRAME_TOO_LARGE (a line over 1 MiB),
 * METHOD_NOT_FOUND (data.allowed lists the methods).
 */
class RequestException extends RemoteException
{
}

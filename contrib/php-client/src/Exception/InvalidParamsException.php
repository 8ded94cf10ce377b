<?php

declare(strict_types=1);

namespace Jobd\Exception;

/**
 * A parameter is missing, unknown or has a bad value (INVALID_PARAMS; data.param names it), or a workflow
 * launch left out a declared parameter or passed an undeclared one (INVALID_WORKFLOW_PARAMETERS).
 */
class InvalidParamsException extends RemoteException
{
}

<?php

declare(strict_types=1);

namespace Jobd\Exception;

/**
 * daemon.reload found a broken configuration file (CONFIG_INVALID); the running configuration is unchanged.
 */
class ConfigException extends RemoteException
{
}

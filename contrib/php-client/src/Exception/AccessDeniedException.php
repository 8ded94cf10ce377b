<?php

declare(strict_types=1);

namespace Jobd\Exception;

/**
 * INSUFFICIENT_RIGHTS: the peer may not do that; data.missing names the right (read, exec, kill, edit, admin).
 */
class AccessDeniedException extends RemoteException
{
    /** The missing right ("kill", "admin", …), as jobd named it. */
    public function getMissingRight(): ?string
    {
        $missing = $this->getData()['missing'] ?? null;
        return is_string($missing) ? $missing : null;
    }
}

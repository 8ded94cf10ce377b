<?php

declare(strict_types=1);

namespace Jobd\Exception;

/**
 * Base of every exception this client throws.
 *
 * Errors jobd sent carry its stable wire code (`error.data.code`, e.g. "UNKNOWN_QUEUE") and the rest of
 * `error.data`; match on the class or on getWireCode(), never on the message. Errors the client raises itself
 * (no socket, connection lost, a reply it cannot read) have no wire code: getWireCode() is null.
 */
class JobdException extends \RuntimeException
{
    /**
     * @param array<string, mixed> $data
     */
    public function __construct(
        string $message,
        private readonly ?string $wireCode = null,
        private readonly array $data = [],
        private readonly ?int $rpcCode = null,
        ?\Throwable $previous = null,
    ) {
        // The numeric JSON-RPC code doubles as getCode(), as PHP code expects an integer there.
        parent::__construct($message, $rpcCode ?? 0, $previous);
    }

    /** jobd's stable token ("UNKNOWN_JOB", "INVALID_PARAMS", …), or null for an error raised by this client. */
    public function getWireCode(): ?string
    {
        return $this->wireCode;
    }

    /**
     * `error.data` as jobd sent it, without its `code`: the details of the error (`queue`, `allowed`, `param`,
     * `missing`, …). Empty for an error raised by this client.
     *
     * @return array<string, mixed>
     */
    public function getData(): array
    {
        return $this->data;
    }

    /** The JSON-RPC numeric code (-32001 …), or null for an error raised by this client. */
    public function getRpcCode(): ?int
    {
        return $this->rpcCode;
    }
}

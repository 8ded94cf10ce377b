<?php

declare(strict_types=1);

namespace Jobd\Exception;

/**
 * jobd's wire error codes (jobd/errors.py, docs/protocol.md "Errors") and the exception family of each.
 *
 * tests/test_php_composer_client.py checks that every code jobd defines is listed here.
 */
final class ErrorMap
{
    /** @var array<string, class-string<RemoteException>> */
    public const FAMILIES = [
        'PARSE_ERROR' => RequestException::class,
        'INVALID_REQUEST' => RequestException::class,
        'FRAME_TOO_LARGE' => RequestException::class,
        'METHOD_NOT_FOUND' => RequestException::class,
        // evQueue's XML protocol only; listed so the table is jobd's whole list.
        'INVALID_XML' => RequestException::class,
        'UNKNOWN_COMMAND' => RequestException::class,
        'INVALID_PARAMS' => InvalidParamsException::class,
        'INVALID_WORKFLOW_PARAMETERS' => InvalidParamsException::class,
        'UNKNOWN_QUEUE' => NotFoundException::class,
        'UNKNOWN_TASK' => NotFoundException::class,
        'UNKNOWN_JOB' => NotFoundException::class,
        'UNKNOWN_WORKFLOW' => NotFoundException::class,
        'UNKNOWN_INSTANCE' => NotFoundException::class,
        'UNKNOWN_SCHEDULE' => NotFoundException::class,
        'OUTPUT_MISSING' => NotFoundException::class, // job.output: a file jobd wrote was removed
        'QUEUE_CLOSED' => StateException::class,
        'JOB_FINISHED' => StateException::class,
        'INSUFFICIENT_RIGHTS' => AccessDeniedException::class,
        'AUTH_ERROR' => AccessDeniedException::class, // evQueue's TCP login only
        'SHUTTING_DOWN' => UnavailableException::class,
        'TOO_MANY_CONNECTIONS' => UnavailableException::class,
        'STORE_FAILED' => UnavailableException::class,
        'OUT_OF_RESOURCES' => UnavailableException::class,
        'CONFIG_INVALID' => ConfigException::class,
        'INTERNAL_ERROR' => ServerException::class,
        'TIMED_OUT' => ServerException::class,
    ];

    /** Tokens for error replies without data.code (a JSON-RPC server that is not jobd, or a bug). */
    private const STANDARD = [
        -32700 => 'PARSE_ERROR',
        -32600 => 'INVALID_REQUEST',
        -32601 => 'METHOD_NOT_FOUND',
        -32602 => 'INVALID_PARAMS',
        -32603 => 'INTERNAL_ERROR',
    ];

    /**
     * The exception for a reply's `error` member.
     *
     * @param mixed $error
     */
    public static function exception(mixed $error): JobdException
    {
        if (!is_array($error)) {
            return new ProtocolException('malformed JSON-RPC error member: ' . json_encode($error));
        }
        $rpcCode = is_int($error['code'] ?? null) ? $error['code'] : -32603;
        $data = is_array($error['data'] ?? null) ? $error['data'] : [];
        $code = $data['code'] ?? null;
        if (!is_string($code)) {
            $code = self::STANDARD[$rpcCode] ?? 'INTERNAL_ERROR';
        }
        unset($data['code']);
        $message = is_string($error['message'] ?? null) ? $error['message'] : '';
        $class = self::FAMILIES[$code] ?? ServerException::class;
        return new $class("$code: $message", $code, $data, $rpcCode);
    }
}

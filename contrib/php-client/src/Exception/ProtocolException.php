<?php

declare(strict_types=1);

namespace Jobd\Exception;

/**
 * The peer sent something that is not JSON-RPC 2.0 as jobd speaks it (is the socket really jobd's? Its
 * evqueue_socket, which speaks evQueue's XML, is named as such). The connection is closed.
 */
class ProtocolException extends JobdException
{
}

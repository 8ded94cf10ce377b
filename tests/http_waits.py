"""Requests over HTTP that wait, sent so that the test knows jobd has identified their client before it goes on
(a reload then must change what they are answered): for tests/test_http_api.py, and for the clients that
tests/test_access_users.py runs as other users, which import this module alone (no pytest, no harness)."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any


def send_waiting_request(connection: socket.socket, method: str, params: dict[str, Any], token: str = "") -> None:
    """POST /api/`method` on `connection`, its client identified when this returns (by `token`, or without one by
    the peer credentials of a unix socket). The answer is the caller's to read (`answer`)."""
    connection.sendall(send_head_identified(connection, method, token, params))


def send_head_identified(connection: socket.socket, method: str, token: str, params: dict[str, Any]) -> bytes:
    """The head of POST /api/`method` sent on `connection`, its client identified when this returns; the body, still
    to send, returned. The head asks for `100 Continue`, which aiohttp writes in the step that runs jobd's
    middleware (where the client is identified) without waiting in between; jobd then waits for the body."""
    body = json.dumps(params).encode()
    head = f"POST /api/{method} HTTP/1.1\r\nHost: jobd\r\n"
    if token:
        head += f"Authorization: Bearer {token}\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
    connection.sendall(head.encode())
    interim = b""
    while not interim.endswith(b"\r\n\r\n"):
        chunk = connection.recv(1)  # one byte at a time: nothing of the answer is read with it
        assert chunk, interim
        interim += chunk
    assert interim.startswith(b"HTTP/1.1 100 "), interim
    return body


def answer(connection: socket.socket) -> tuple[int, Any]:
    """The status and JSON body of the answer on `connection`, read to its end; `connection` is closed."""
    with connection:
        response = http.client.HTTPResponse(connection)
        response.begin()
        return response.status, json.loads(response.read())

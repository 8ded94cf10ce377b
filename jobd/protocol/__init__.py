"""Wire formats: bytes in, requests out; results out, bytes back. No sockets, no engine."""

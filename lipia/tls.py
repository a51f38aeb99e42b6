"""One TLS context for every outgoing HTTPS client of the process.

httpx builds a context for each client it creates, and loading the system's certificate
authorities into one takes about 70 ms of CPU: a cost paid again by every process start, every
`lipia doctor` check and every test server. The context is read-only once made (certificate
verification on, the system's authorities, httpx's and Python's defaults), so one serves all.
"""

from __future__ import annotations

import ssl
from functools import cache


@cache
def client_context() -> ssl.SSLContext:
    """The verifying client context every lipia HTTPS client uses (``verify=`` in httpx)."""
    return ssl.create_default_context()

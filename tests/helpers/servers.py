"""An HTTP server served on a thread for the length of a `with` block."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from http.server import ThreadingHTTPServer


@contextmanager
def serving(server: ThreadingHTTPServer):
    """Serves `server` on a daemon thread and yields its base URL, http://127.0.0.1:PORT;
    shuts it down and closes it on the way out."""
    # A short poll interval: `shutdown` waits for the next poll.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()

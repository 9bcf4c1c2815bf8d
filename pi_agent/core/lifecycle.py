"""The server's shutdown, as the streams see it."""
from __future__ import annotations

import time

# What a stream keeps in hand, before the WSGI server's graceful timeout runs out, to write
# its last event and close the upstream.
MARGIN_SECONDS = 2.0


class Shutdown:
    """When the server started to shut down, and when running streams must stop by."""

    def __init__(self) -> None:
        self.deadline: float | None = None

    def begin(self, grace_seconds: float) -> None:
        """Streams may run on for ``grace_seconds`` (less a margin), then must end."""
        if self.deadline is None:
            self.deadline = time.monotonic() + max(0.0, grace_seconds - MARGIN_SECONDS)

    @property
    def begun(self) -> bool:
        return self.deadline is not None

    def due(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

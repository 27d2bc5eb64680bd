"""``ldm-serve``: text-to-image over HTTP with step-level batching (``app`` the HTTP layer, ``batcher`` the
queue and the worker thread, ``cli`` the command)."""

"""kopf handlers (``__main__`` imports them by name, which registers them)."""

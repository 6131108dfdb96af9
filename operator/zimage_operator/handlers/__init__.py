"""kopf handlers. ``__main__`` imports the modules by name; this package registers the ones it does not."""

from zimage_operator.handlers import edits

__all__ = ["edits"]

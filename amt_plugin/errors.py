"""Errors a user can fix: fairseq's commands print their message alone, without a traceback.

`UsageError` is what the plugin raises for a flag, an input or a combination it refuses (a
ValueError, so that code which catches those still does). `install()` (run when the plugin
is imported) makes an uncaught one print `error: MESSAGE` and exit with status 1; every other
exception keeps Python's traceback.
"""

import sys


class UsageError(ValueError):
    """A flag, input or combination the plugin refuses; the message names the fix."""


def install() -> None:
    previous = sys.excepthook
    if getattr(previous, "prints_usage_errors", False):
        return

    def excepthook(kind, error, traceback):
        if issubclass(kind, UsageError):
            print(f"error: {error}", file=sys.stderr)
            return
        previous(kind, error, traceback)

    excepthook.prints_usage_errors = True
    sys.excepthook = excepthook

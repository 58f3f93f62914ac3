"""Models registered by the plugin: `amt` and its architectures."""

from . import amt  # noqa: F401

"""Tasks registered by the plugin."""

from . import adversarial_masked_lm  # noqa: F401

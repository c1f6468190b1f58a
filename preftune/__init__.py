"""preftune: preference tuning for language models."""

__version__ = "0.1.0"

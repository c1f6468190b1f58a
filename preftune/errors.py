"""User-facing errors: the CLI prints their message on one line and exits non-zero (traceback with --debug)."""


class PreftuneError(Exception):
    """An error the user can act on: bad config, missing file, unusable data, unreachable model."""


class ConfigError(PreftuneError):
    """The config is malformed, has unknown keys, or a value of the wrong type."""

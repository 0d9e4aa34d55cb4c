"""The one exception type a user is meant to read.

Anything raised as `PrometheanError` carries a complete sentence; the CLI prints it and exits
non-zero without a traceback. Everything else is a bug and keeps its traceback.
"""


class PrometheanError(Exception):
    """A problem with the user's input (config, file, request) described in one sentence."""


class ConfigError(PrometheanError, ValueError):
    """A configuration value or file is invalid."""


class CheckpointError(PrometheanError):
    """A checkpoint directory is missing, incomplete or inconsistent with its config."""

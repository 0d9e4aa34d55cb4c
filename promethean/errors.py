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


class TrainingInterrupted(Exception):
    """A training stopped by SIGINT or SIGTERM after saving what resumes it (a `learn` stage,
    chat tuning). The CLI prints the message and exits 128 + the signal's number (130, 143), as
    it does for the trainer's own interruption."""

    def __init__(self, message: str, signal_name: str) -> None:
        super().__init__(message)
        self.signal_name = signal_name

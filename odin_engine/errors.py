"""Exceptions the command line turns into exit code 2 (bad configuration)."""


class ConfigError(ValueError):
    """A user-fixable configuration problem; the message says what to fix."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be loaded safely or does not fit the architecture."""

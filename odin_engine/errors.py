"""Exceptions the command line turns into exit code 2 (bad configuration)."""


class ConfigError(ValueError):
    """A user-fixable configuration problem; the message says what to fix."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be loaded safely or does not fit the architecture."""


class SettingError(ConfigError):
    """A setting out of range. ``parameter`` names it as the engine knows it (``tpr``,
    ``temperature``, …); the command line maps that name to its flag."""

    def __init__(self, parameter: str, message: str):
        super().__init__(message)
        self.parameter = parameter

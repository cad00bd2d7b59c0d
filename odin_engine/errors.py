"""Exceptions the command line turns into exit code 2 (bad configuration), and the one-line form of any error."""

from __future__ import annotations

import re


class ConfigError(ValueError):
    """A user-fixable configuration problem; the message says what to fix."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be loaded safely or does not fit the architecture."""


_ADDRESS = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>|\s+at 0x[0-9a-fA-F]+")


def short_error(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, memory addresses removed (they change every run), at most ``limit`` characters."""
    text = _ADDRESS.sub("", f"{type(exc).__name__}: {exc}".replace("\n", " ")).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


class SettingError(ConfigError):
    """A setting out of range. ``parameter`` names it as the engine knows it (``tpr``,
    ``temperature``, …); the command line maps that name to its flag."""

    def __init__(self, parameter: str, message: str):
        super().__init__(message)
        self.parameter = parameter

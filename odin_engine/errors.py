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

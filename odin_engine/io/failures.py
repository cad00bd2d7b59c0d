"""One classification of the errors a row can carry: **retryable** or **final** (no Ray).

Every error the scoring job writes into a row's ``error`` column starts with one of the
:data:`MESSAGES` kinds below. The kind decides the rerun contract:

* **retryable** — the next run of the same command attempts the row again (it is not
  ``done``): the cause may go away or an operator may fix it — network errors, timeouts,
  throttling, 5xx answers, permission denied, a missing object, a scoring failure.
* **final** — the same bytes (same ``version``) always give the same verdict: a rerun keeps the
  row and does not read it again — an unsupported scheme or malformed path, a non-regular file,
  an I/O error on a pseudo file, a decode failure, a listing error. A final row is attempted
  again only when its ``version`` (or ``uri``) changes.

:func:`is_retryable` is the contract (by prefix, vectorised by the job's plan stage);
:func:`read_failure` turns an exception raised while reading one object into its message;
:func:`is_transient` says whether a failure is worth retrying *inside* the run (with backoff).
Paths in messages are text: :func:`path_text` (undecodable bytes and control characters as
``%XX``), never ``b'…'``.
"""

from __future__ import annotations

import errno
import re
from typing import NamedTuple

from odin_engine.errors import short_error


class Kind(NamedTuple):
    prefix: str  # the message starts with it
    retryable: bool
    stage: str  # where it is written: listing | read | decode | score
    meaning: str


# Every message kind the job can write in a row's `error` (docs/scoring-job.md lists the same table).
MESSAGES: tuple[Kind, ...] = (
    Kind("read failed:", True, "read", "network error, timeout, throttling, 5xx, permission denied or missing object "
         "(after in-run retries for transient causes)"),
    Kind("scoring failed:", True, "score", "the model raised on this image's batch"),
    Kind("bad uri:", False, "read", "unsupported scheme (http://, …) or malformed path (empty path component, "
         "`.`/`..` segment the store refuses)"),
    Kind("unreadable:", False, "read", "a deterministic OS error: I/O error (EIO, e.g. a /proc file), is a directory, "
         "name too long, too many symlink levels"),
    Kind("not a regular file:", False, "listing/read", "FIFO, socket, device node, directory"),
    Kind("file too large:", False, "read", "bigger than --max-bytes"),
    Kind("empty file:", False, "decode", "0 bytes"),
    Kind("not an image", False, "decode", "not one of the accepted formats"),
    Kind("truncated or corrupt:", False, "decode", "the decoder failed on the bytes"),
    Kind("decompression bomb:", False, "decode", "more pixels than Pillow's limit"),
    Kind("unsupported:", False, "decode", "a mode or shape the converter refuses"),
    Kind("undecodable:", False, "decode", "any other decoder exception"),
    Kind("directory symlink not followed:", False, "listing", "a symlink to a directory (never entered)"),
    Kind("dangling symlink:", False, "listing", "the link's target does not exist"),
    Kind("symlink loop:", False, "listing", "the link leads back to itself"),
    Kind("unreadable entry:", False, "listing", "the entry cannot be stat'ed (e.g. inside a directory without "
         "search permission)"),
    Kind("unreadable directory:", False, "listing", "the directory cannot be listed or traversed; its contents "
         "are not listed (this one row stands for them)"),
    Kind("directory loop:", False, "listing", "a directory met again below itself (bind-mount loop)"),
    Kind("unreadable key:", False, "listing", "an object key that cannot be read through this store's API"),
)
RETRYABLE_PREFIXES = tuple(k.prefix for k in MESSAGES if k.retryable)
FINAL_PREFIXES = tuple(k.prefix for k in MESSAGES if not k.retryable)


def is_retryable(error: str | None) -> bool:
    """The rerun contract: an error row whose text starts with a retryable kind's prefix."""
    return bool(error) and str(error).startswith(RETRYABLE_PREFIXES)


def kind_of(error: str) -> Kind | None:
    """The :class:`Kind` a message belongs to (None for a message no kind names: a bug)."""
    return next((k for k in MESSAGES if str(error).startswith(k.prefix)), None)


# --------------------------------------------------------------------------- paths as text
def path_text(path: bytes | str) -> str:
    """A path for a message: text as it is; undecodable bytes and control characters as ``%XX``
    (and then ``%`` as ``%25``, so that the escaping is reversible)."""
    raw = path if isinstance(path, bytes) else str(path).encode("utf-8", "surrogateescape")
    text = raw.decode("utf-8", "surrogateescape")
    odd = lambda c: 0xDC80 <= ord(c) <= 0xDCFF or ord(c) < 0x20 or ord(c) == 0x7F  # noqa: E731
    if not any(odd(c) for c in text):
        return text
    return "".join(f"%{(ord(c) - 0xDC00) if ord(c) >= 0xDC80 else ord(c):02X}" if odd(c) else "%25" if c == "%" else c
                   for c in text)


def _plain_short(text: str, limit: int) -> str:
    text = text.replace("\n", " ").strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def os_error_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: [Errno N] reason: path`` on one line, the path(s) as :func:`path_text`; other exceptions as
    :func:`~odin_engine.errors.short_error`."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{type(exc).__name__}: [Errno {exc.errno}] {exc.strerror}: {path_text(exc.filename)}"
        if exc.filename2 is not None:
            text += f" -> {path_text(exc.filename2)}"
        return _plain_short(text, limit)
    return short_error(exc, limit)


# --------------------------------------------------------------------------- in-run retries
_NOT_TRANSIENT = re.compile(
    r"ACCESS_DENIED|AccessDenied|NoSuchKey|NoSuchBucket|INVALID_ACCESS_KEY|SIGNATURE_DOES_NOT_MATCH|"
    r"PERMISSION_DENIED|UNAUTHENTICATED|NOT_FOUND|HTTP status (?:400|401|403|404)\b"
)
_TRANSIENT = re.compile(
    r"NETWORK_CONNECTION|SLOW_DOWN|SlowDown|THROTTL|Throttl|TooManyRequests|REQUEST_TIMEOUT|RequestTimeout|"
    r"SERVICE_UNAVAILABLE|ServiceUnavailable|INTERNAL_FAILURE|InternalError|HTTP status (?:429|5\d\d)\b|"
    r"\b(?:UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED|ABORTED|INTERNAL)\b|"
    r"curlCode: (?:[1-9]\d*)|CURL error|[Cc]onnection (?:reset|refused|aborted|closed)|[Cc]ould(?:n't| not) connect|"
    r"[Tt]imed? ?out|[Tt]emporar(?:y|ily)|[Tt]ry again"
)
_TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                     errno.ECONNABORTED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EPIPE,
                     errno.ESTALE}
# deterministic OS errors: the same path gives the same answer on every run
_FINAL_ERRNOS = {errno.EIO, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP, errno.EINVAL,
                 errno.ENXIO, errno.ENODEV, errno.EOVERFLOW, errno.EFBIG}
# the store will never accept the URI: a rerun cannot help
_BAD_URI = re.compile(r"Unrecognized filesystem type|Empty path component|Expected a URI|Cannot parse URI|"
                      r"[Ii]nvalid (?:URI|bucket name|object name|path)|path traversal|must not contain|"
                      r"Bucket name cannot be empty|not a valid URI")


def is_transient(exc: BaseException) -> bool:
    """Worth retrying inside the run: network errors, timeouts, throttling, 5xx (S3 and GCS messages as pyarrow words them)."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError, InterruptedError)):
        return True
    if not isinstance(exc, OSError):
        return False
    if exc.errno in _TRANSIENT_ERRNOS:
        return True
    text = str(exc)
    return not _NOT_TRANSIENT.search(text) and bool(_TRANSIENT.search(text))


def read_failure(exc: BaseException, attempts: int = 1, limit: int = 280) -> str:
    """The row message for an exception raised while reading one object (see :data:`MESSAGES`)."""
    detail = os_error_line(exc, limit)
    if not is_transient(exc):
        if _BAD_URI.search(str(exc)) or isinstance(exc, (ValueError, NotImplementedError)) and not isinstance(
                exc, OSError):
            return "bad uri: " + detail
        if isinstance(exc, IsADirectoryError):
            return "not a regular file: " + detail
        if isinstance(exc, OSError) and exc.errno in _FINAL_ERRNOS:
            return "unreadable: " + detail
    after = f" (after {attempts} attempts)" if attempts > 1 else ""
    return "read failed: " + detail + after

"""read_object: transient object-store failures retried inside the run (moto's real S3 API and the
GCS emulator behind a real, flaky TCP proxy), permanent ones at once, and row messages that are
stable (the rerun contract) and free of memory addresses."""

from __future__ import annotations

import socket
import threading
import time
from datetime import timedelta

import pytest
from pyarrow import fs as pafs

from conftest import make_images
from odin_engine.io.images import FORMATS, ImageDecodeError, decode_image
from odin_engine.io.reading import RETRYABLE_PREFIXES, ReadError, is_retryable, is_transient, read_object
from jobs.pipeline import read_and_decode


class FlakyProxy:
    """A real TCP proxy on loopback: its first ``fail`` connections are answered ``503 Slow Down``
    (``mode="503"``) or closed without a reply (``mode="close"``); later ones reach ``target``."""

    def __init__(self, target_port: int, fail: int, mode: str = "503"):
        self.target_port, self.fail, self.mode, self.seen = target_port, fail, mode, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.seen += 1
            if self.seen <= self.fail:
                if self.mode == "503":
                    conn.recv(65536)
                    body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    conn.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                conn.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    return monkeypatch


def _new_bucket(s3_server, tmp_path, key="k.png") -> tuple[str, bytes]:
    import uuid

    bucket = f"odin-{uuid.uuid4().hex[:12]}"  # fresh: filesystems are cached per bucket
    data = make_images(tmp_path / bucket, 1)[0].read_bytes()
    client = s3_server.client()
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key=key, Body=data)
    return bucket, data


def test_transient_s3_failures_are_retried_until_they_pass(s3_server, s3_env, tmp_path):
    # 1. a store that keeps answering 503: every attempt fails, the message says so, and it is transient
    down_bucket, _ = _new_bucket(s3_server, tmp_path)
    down = FlakyProxy(_port(s3_server.endpoint), fail=10**6, mode="503")
    s3_env.setenv("AWS_ENDPOINT_URL", down.endpoint)
    with pytest.raises(ReadError) as info:
        read_object(f"s3://{down_bucket}/k.png", attempts=1)
    per_attempt = down.seen  # connections pyarrow's own S3 client spends on one of our attempts
    assert per_attempt >= 1 and info.value.transient and info.value.attempts == 1
    assert str(info.value).startswith("read failed: OSError: ") and "HTTP status 503" in str(info.value)
    assert is_retryable(str(info.value))
    with pytest.raises(ReadError, match=r"^read failed: .* \(after 2 attempts\)$") as info:
        read_object(f"s3://{down_bucket}/k.png", attempts=2, backoff=0.01)
    assert info.value.attempts == 2 and down.seen > 2 * per_attempt
    # 2. a glitch longer than the client's own retries: our retry gets the bytes
    bucket, data = _new_bucket(s3_server, tmp_path)
    flaky = FlakyProxy(_port(s3_server.endpoint), fail=per_attempt + 1, mode="503")
    s3_env.setenv("AWS_ENDPOINT_URL", flaky.endpoint)
    assert read_object(f"s3://{bucket}/k.png", attempts=4, backoff=0.01) == data
    assert flaky.seen > per_attempt + 1
    down.close(), flaky.close()


def test_a_store_that_is_down_for_everyone_fails_fast(s3_server, s3_env, tmp_path):
    """Connections closed without a reply are transient; after FAILING_STREAK_LIMIT objects in a row
    failed that way, each object is tried once, until one read succeeds."""
    from odin_engine.io import reading

    bucket, data = _new_bucket(s3_server, tmp_path)
    down = FlakyProxy(_port(s3_server.endpoint), fail=10**6, mode="close")
    s3_env.setenv("AWS_ENDPOINT_URL", down.endpoint)
    s3_env.setattr(reading, "_failing_streak", reading.FAILING_STREAK_LIMIT)
    with pytest.raises(ReadError, match="^read failed: OSError: .*NETWORK_CONNECTION") as info:
        read_object(f"s3://{bucket}/k.png", attempts=4, backoff=0.01)
    assert info.value.transient and info.value.attempts == 1
    down.close()
    s3_env.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    ok_bucket, data = _new_bucket(s3_server, tmp_path)
    assert read_object(f"s3://{ok_bucket}/k.png") == data and reading._failing_streak == 0


def test_permanent_failures_are_not_retried(s3_server, s3_env, tmp_path):
    bucket, data = _new_bucket(s3_server, tmp_path)
    t0 = time.time()
    with pytest.raises(ReadError, match=r"^read failed: FileNotFoundError: .*missing\.png") as info:
        read_object(f"s3://{bucket}/missing.png", attempts=5, backoff=1.0)
    assert time.time() - t0 < 1.0 and info.value.attempts == 1 and not info.value.transient
    with pytest.raises(ReadError, match=r"^file too large: \d+ bytes > 10$") as info:
        read_object(f"s3://{bucket}/k.png", max_bytes=10)
    assert not info.value.retryable
    with pytest.raises(ReadError, match="^read failed: FileNotFoundError"):
        read_object(str(tmp_path / "nope.png"))
    with pytest.raises(ReadError, match="^not a regular file: .* is a directory"):
        read_object(str(tmp_path))


def test_gcs_messages_are_classified(gcs_server):
    """Real errors from pyarrow's GCS client (emulator behind the flaky proxy, and a closed port)."""
    host = gcs_server.host.split("://", 1)[1]
    gcs = pafs.GcsFileSystem(anonymous=True, endpoint_override=host, scheme="http", project_id="p")
    gcs.create_dir("bkt-classify")
    with gcs.open_output_stream("bkt-classify/k.png") as fh:
        fh.write(b"x")
    seen = []
    with pytest.raises(FileNotFoundError) as missing:
        gcs.open_input_file("bkt-classify/missing.png")
    seen.append((missing.value, False))
    proxy = FlakyProxy(_port(gcs_server.host), fail=10**6, mode="503")
    for endpoint in (f"127.0.0.1:{proxy.port}", "127.0.0.1:1"):
        flaky = pafs.GcsFileSystem(anonymous=True, endpoint_override=endpoint, scheme="http", project_id="p",
                                   retry_time_limit=timedelta(seconds=0.5))
        with pytest.raises(OSError) as down:
            flaky.open_input_file("bkt-classify/k.png")
        seen.append((down.value, True))
    proxy.close()
    for exc, transient in seen:
        assert is_transient(exc) is transient, str(exc)


def test_classification_of_messages_and_errnos():
    import errno

    transient = [TimeoutError("timed out"), ConnectionResetError(errno.ECONNRESET, "reset"),
                 OSError(errno.ETIMEDOUT, "Connection timed out"),
                 OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate."),
                 OSError("AWS Error UNKNOWN (HTTP status 500) during GetObject operation"),
                 OSError("google::cloud::Status(RESOURCE_EXHAUSTED: rate limit)")]
    permanent = [FileNotFoundError(errno.ENOENT, "gone"), PermissionError(errno.EACCES, "denied"),
                 OSError("AWS Error ACCESS_DENIED during HeadObject operation: No response body."),
                 OSError("AWS Error UNKNOWN (HTTP status 403) during HeadObject operation"),
                 OSError("google::cloud::Status(PERMISSION_DENIED: no access)"),
                 ValueError("bad uri"), OSError("Is a directory")]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in permanent] == [False] * len(permanent)
    assert RETRYABLE_PREFIXES == ("read failed:", "scoring failed:")
    for msg, want in (("read failed: OSError: x", True), ("scoring failed: RuntimeError: y", True),
                      ("not an image (…): z", False), ("dangling symlink: …", False), (None, False)):
        assert is_retryable(msg) is want


def test_row_errors_carry_no_memory_addresses(tmp_path):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(b"this is not an image at all", 32)
    assert "0x" not in str(info.value) and str(info.value).startswith("not an image")
    (tmp_path / "bad.png").write_bytes(b"garbage bytes")
    import pyarrow as pa

    out = read_and_decode(pa.table({"image_id": ["bad.png"], "uri": [str(tmp_path / "bad.png")]}), 32, "crop")
    (err,) = out.column("error").to_pylist()
    assert err == f"not an image (or not one of {', '.join(FORMATS)}): UnidentifiedImageError: cannot identify image file"

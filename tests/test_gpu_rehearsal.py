"""The GPU rehearsal does not rot: its CPU mode runs whole, the slim Ray wheel runs Ray Data, and the
GPU-decode stage (``--decode-device cuda``) keeps every row, checked here with the CPU decoder of
the same code path.

The Ray parts are ``slow``: ``flock /tmp/odin-ray.lock timeout 900 pytest tests/test_gpu_rehearsal.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pyarrow as pa
import pytest

from conftest import REPO
from _forkserver import run_command

sys.path.insert(0, str(REPO / "benchmarks" / "gpu"))


def _jpegs(n: int, w: int = 500, h: int = 375) -> list[bytes]:
    from benchmarks.gpu_rehearsal import _jpeg

    return [_jpeg((i, w, h)) for i in range(n)]


def test_gpu_decoder_matches_the_cpu_decoder_within_resampling():
    from jobs.gpu_decode import decode_batch_on_gpu, gpu_decodable
    from odin_engine.io.images import decode_image

    blobs = _jpegs(3)
    assert all(gpu_decodable(b) == (500, 375) for b in blobs)
    for policy in ("crop", "stretch"):
        for blob, arr in zip(blobs, decode_batch_on_gpu(blobs, 224, policy, device="cpu")):
            ref = decode_image(blob, 224, policy)[0]
            diff = np.abs(ref.astype(int) - arr.astype(int))
            assert arr.shape == (224, 224, 3) and arr.dtype == np.uint8
            assert diff.mean() < 1.0 and diff.max() <= 8, (policy, diff.mean(), diff.max())


def test_gpu_decode_stage_keeps_every_row(tiny_model, bad_images):
    """Bad files, PNGs, EXIF-rotated JPEGs: one row each, with the CPU path's status and size."""
    from conftest import BAD_EXPECT
    from jobs.gpu_decode import GpuDecodeScoreBatch
    from odin_engine.loading import load_model
    from odin_engine.io.images import ImageDecodeError, decode_image
    from odin_engine.io.scores import output_schema

    loaded = load_model(tiny_model.spec, tiny_model.weights)
    names = sorted(bad_images) + ["photo_a.jpg", "photo_b.jpg"]
    blobs = [bad_images[n] for n in sorted(bad_images)] + _jpegs(2, 64, 48)
    schema = output_schema(pa.schema([]), {})
    actor = GpuDecodeScoreBatch(
        spec=tiny_model.spec, weights=tiny_model.weights, mean=list(loaded.mean), std=list(loaded.std),
        input_size=32, temperature=1000.0, epsilon=0.0014, batch_size=8, model_id=loaded.model_id, run_id="r",
        threads=1, unsafe_pickle=False, schema_bytes=schema.serialize().to_pybytes(), device="cpu", policy="crop")
    batch = pa.table({"image_id": names, "uri": [f"mem://{n}" for n in names], "status": ["ok"] * len(names),
                      "error": [None] * len(names), "data": blobs})
    out = actor(batch)
    assert out.column("image_id").to_pylist() == names
    for name, blob, status, w, h in zip(names, blobs, out.column("status").to_pylist(),
                                        out.column("width").to_pylist(), out.column("height").to_pylist()):
        try:
            _, ref_w, ref_h = decode_image(blob, 32, "crop")
            expect = "ok"
        except ImageDecodeError:
            expect, ref_w, ref_h = "error", None, None
        assert status == expect == BAD_EXPECT.get(name, "ok"), name
        assert (w, h) == (ref_w, ref_h), name
    assert out.column("odin").null_count == out.column("status").to_pylist().count("error")


@pytest.mark.slow
def test_cpu_rehearsal_runs_whole(tmp_path):
    out = tmp_path / "r.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("RAY_ADDRESS", None)
    proc = run_command([sys.executable, "-m", "benchmarks.gpu_rehearsal", "--device", "cpu", "--images", "24",
                           "--width", "120", "--height", "90", "--out", str(out), "--workdir", str(tmp_path / "w")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["forward_images_per_s"] > 0 and doc["odin_images_per_s"] > 0 and doc["decode_cpu_images_per_s"] > 0
    (job,) = doc["jobs"]
    assert job["rows"] == job["ok"] == 24 and job["exactly_once"] and job["cluster"]["how"] == "local"
    assert {"odin_vs_forward", "job_cpu_decode_vs_odin", "decode_cpu_vs_job"} <= set(doc["ratios"])
    assert "ODIN in-process" in proc.stdout and "odin_vs_forward" in proc.stdout


def test_slim_wheel_drops_files_and_rewrites_record(tmp_path):
    from rebuild_ray_wheel import slim_wheel

    src = tmp_path / "ray-0-py3-none-any.whl"
    with zipfile.ZipFile(src, "w") as z:
        for name in ("ray/__init__.py", "ray/jars/x.jar", "ray/rllib/a.py", "ray/serve/b.py",
                     "ray/dashboard/client/build/static/js/main.js", "ray/dashboard/client/build/static/js/main.js.map"):
            z.writestr(name, b"x" * 10)
        info = zipfile.ZipInfo("ray/core/gcs_server")
        info.external_attr = 0o755 << 16
        z.writestr(info, b"\x7fELF")
        z.writestr("ray-0.dist-info/RECORD", "stale\n")
    dest = tmp_path / "out.whl"
    stats = slim_wheel(src, dest)
    assert stats["dropped_files"] == 4
    with zipfile.ZipFile(dest) as z:
        names = set(z.namelist())
        record = z.read("ray-0.dist-info/RECORD").decode().splitlines()
        assert z.getinfo("ray/core/gcs_server").external_attr >> 16 == 0o755
    assert names == {"ray/__init__.py", "ray/dashboard/client/build/static/js/main.js", "ray/core/gcs_server",
                     "ray-0.dist-info/RECORD"}
    assert sorted(r.split(",")[0] for r in record) == sorted(names)
    assert all(r.split(",")[1].startswith("sha256=") for r in record if not r.endswith("RECORD,,"))


@pytest.mark.slow
def test_ray_data_runs_from_the_slim_wheel(tmp_path):
    """Rebuild the wheel for this Python (from PyPI; skipped offline) and run a Ray Data pipeline from it."""
    from rebuild_ray_wheel import check, pip_download, slim_wheel

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    try:
        full = pip_download("ray==2.60.0", tmp_path, version)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot download ray==2.60.0 from the package index: {exc}")
    slim = tmp_path / "slim" / full.name
    slim.parent.mkdir()
    stats = slim_wheel(full, slim)
    assert stats["bytes_after"] < 48 * 2**20 < stats["bytes_before"], stats
    assert "ray data ok from" in check(slim)

"""Frozen calibration: a calibration.json is reused only for the model and settings it was made for."""

from __future__ import annotations

import numpy as np
import pytest

from odin_engine.decide.calibration import calibrate
from odin_engine.decide.frozen import (SCORING_KEYS, check_calibration, load_frozen_calibration, read_calibration,
                                       with_scoring_settings)
from odin_engine.errors import ConfigError
from odin_engine.io.store import Store

MODEL = "cifar_resnet20@sha256:0123456789abcdef"
SCORE_CONFIG = {"model_id": MODEL, "mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.2435, 0.2616],
                "input_size": 32, "resize": "crop", "temperature": 1000.0, "epsilon": 0.0014}
RUN = {"model_id": MODEL, "temperature": 1000.0, "epsilon": 0.0014, "method": "odin",
       "mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.2435, 0.2616], "input_size": 32, "resize": "crop"}


def _old_calibration() -> dict:
    """What calibrate_frames writes (version 1, without the input settings)."""
    cal = calibrate(np.random.default_rng(0).standard_normal(150), 0.95)
    return {"version": 1, **cal, "method": "odin", "model_id": MODEL, "temperature": 1000.0, "epsilon": 0.0014,
            "n_heldout_errors": 0, "created_at": "2026-10-31T12:00:00+00:00"}


def test_round_trip_with_recorded_input_settings(tmp_path):
    cal = with_scoring_settings(_old_calibration(), SCORE_CONFIG)
    Store(str(tmp_path / "calrun")).write_json("calibration.json", cal)
    for uri in (str(tmp_path / "calrun" / "calibration.json"), str(tmp_path / "calrun"),
                f"file://{tmp_path}/calrun/calibration.json"):
        got = load_frozen_calibration(uri, RUN)
        assert got["delta"] == cal["delta"] and got["n_heldout"] == 150 and got["order_statistic_k"] == 143
        assert got["frozen_from"] == uri and got["settings_unchecked"] == []
    # a float that went through JSON compares equal; None in the expectation is not checked
    assert check_calibration(cal, {**RUN, "temperature": 1000, "resize": None}) == []


def test_old_file_loads_and_says_what_it_could_not_check(tmp_path):
    Store(str(tmp_path)).write_json("calibration.json", _old_calibration())
    got = load_frozen_calibration(str(tmp_path / "calibration.json"), RUN)
    assert got["settings_unchecked"] == list(SCORING_KEYS)


def test_mismatch_is_refused_naming_each_difference(tmp_path):
    cal = with_scoring_settings(_old_calibration(), SCORE_CONFIG)
    Store(str(tmp_path)).write_json("calibration.json", cal)
    run = {**RUN, "model_id": "cifar_resnet20@sha256:ffffffffffffffff", "temperature": 1.0, "method": "energy",
           "std": [0.5, 0.5, 0.5], "resize": "stretch"}
    with pytest.raises(ConfigError) as info:
        load_frozen_calibration(str(tmp_path / "calibration.json"), run)
    msg = str(info.value)
    for part in ("model_id: 'cifar_resnet20@sha256:0123456789abcdef' there vs 'cifar_resnet20@sha256:ffffffffffffffff' now",
                 "temperature: 1000.0 there vs 1.0 now", "method: 'odin' there vs 'energy' now",
                 "std: [0.247, 0.2435, 0.2616] there vs [0.5, 0.5, 0.5] now", "resize: 'crop' there vs 'stretch' now",
                 "recalibrate on held-out in-distribution images", "--heldout",
                 "use the calibration made for this model"):
        assert part in msg, (part, msg)
    assert "epsilon" not in msg and "input_size" not in msg
    with pytest.raises(ValueError, match="cannot check"):
        check_calibration(cal, {"tpr": 0.9})


@pytest.mark.parametrize("content,match", [
    (None, "calibration not found"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"delta": 0.5, "method": "odin"}', "lacks"),
    ('{"version": 99, "delta": 0.5}', "version 99"),
])
def test_unusable_files_are_configuration_errors(tmp_path, content, match):
    path = tmp_path / "calibration.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=match):
        read_calibration(str(path))


def test_impossible_statistics_are_refused(tmp_path):
    Store(str(tmp_path)).write_json("calibration.json", {**_old_calibration(), "order_statistic_k": 151})
    with pytest.raises(ConfigError, match="impossible"):
        read_calibration(str(tmp_path / "calibration.json"))


def test_with_scoring_settings_needs_the_score_config():
    with pytest.raises(ValueError, match="lacks"):
        with_scoring_settings(_old_calibration(), {"model_id": MODEL})


def test_from_s3(s3_server, s3_bucket, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    cal = with_scoring_settings(_old_calibration(), SCORE_CONFIG)
    Store(f"s3://{s3_bucket}/calibrations/rn20").write_json("calibration.json", cal)
    uri = f"s3://{s3_bucket}/calibrations/rn20/calibration.json"
    assert load_frozen_calibration(uri, RUN)["delta"] == cal["delta"]
    assert load_frozen_calibration(f"s3://{s3_bucket}/calibrations/rn20/", RUN)["delta"] == cal["delta"]
    with pytest.raises(ConfigError, match="input_size: 32 there vs 64 now"):
        load_frozen_calibration(uri, {**RUN, "input_size": 64})
    with pytest.raises(ConfigError, match="calibration not found"):
        read_calibration(f"s3://{s3_bucket}/calibrations/other/calibration.json")

"""Evaluation against labelled OOD sets: MSP, energy and ODIN side by side, errors left out and counted."""

from __future__ import annotations

import numpy as np
import pytest

from _odin_helpers import noise_images, score_frame, smooth_images, tiny_model
from odin_engine.errors import ConfigError
from odin_engine.decide.evaluation import evaluate_arrays, evaluate_tables
from odin_engine.io.scores import ScoreTable
from odin_engine.metrics import all_metrics


def test_arrays_hand_case():
    # ID: 20 scores 1..20 → δ at 95% TPR is the 19th largest = 2. OOD: 0.5, 1.5, 2, 3 → two reach δ.
    id_s = {"m": np.arange(1, 21, dtype=float)}
    ood = {"a": {"m": np.array([0.5, 1.5, 2.0, 3.0])}}
    out = evaluate_arrays(id_s, ood, methods=["m"], tpr=0.95)
    m = out["sets"]["a"]["metrics"]["m"]
    assert m["threshold"] == 2.0
    assert m["fpr_at_tpr"] == 0.5
    assert out["n_id"] == 20 and out["sets"]["a"]["n"] == 4


def evaluate_frames(held, ood, tpr=0.95):
    return evaluate_tables(ScoreTable.from_table(held), {k: ScoreTable.from_table(v) for k, v in ood.items()},
                           tpr=tpr)[0]


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    model, _ = tiny_model(tmp_path_factory.mktemp("eval"))
    held = score_frame(model, smooth_images(60, 1), prefix="held", errors=2)
    ood = {"noise": score_frame(model, noise_images(30, 2), prefix="n", errors=1),
           "smooth2": score_frame(model, smooth_images(30, 3), prefix="s")}
    return held, ood


def test_frames_side_by_side(frames):
    held, ood = frames
    out = evaluate_frames(held, ood, tpr=0.95)
    assert out["methods"] == ["msp", "energy", "odin"]
    assert out["n_id"] == 58 and out["n_id_errors"] == 2
    assert out["sets"]["noise"]["n"] == 29 and out["sets"]["noise"]["n_errors"] == 1
    h = held[held["status"] == "ok"]
    for name, df in ood.items():
        ok = df[df["status"] == "ok"]
        for m in ("msp", "energy", "odin"):
            got = out["sets"][name]["metrics"][m]
            want = all_metrics(h[m], ok[m], 0.95)
            for k, v in want.items():
                assert got[k] == pytest.approx(v)
            assert set(want) <= set(got)
    assert out["temperature"] == 1000.0 and out["epsilon"] == 0.0014


def test_mismatched_settings_are_refused(frames):
    held, ood = frames
    other = {"noise": ood["noise"].assign(epsilon=0.0)}
    with pytest.raises(ConfigError, match="epsilon"):
        evaluate_frames(held, other)
    with pytest.raises(ConfigError, match="at least one"):
        evaluate_frames(held, {})


def test_only_the_method_columns_are_read(frames):
    """A labelled set without the corpus-only columns (uri, pred, …) evaluates the same."""
    held, ood = frames
    keep = ["image_id", "status", "model_id", "temperature", "epsilon", "msp", "energy", "odin"]
    slim = evaluate_frames(held[keep], {k: v[keep] for k, v in ood.items()})
    assert slim["sets"] == evaluate_frames(held, ood)["sets"]

"""Helpers for the calibration / flagging / tuning / report / audit tests (not fixtures: plain functions).

Score tables are made by the real ``OdinScorer`` on a real (randomly initialized, tiny-input)
CIFAR ResNet-20, in the score job's Parquet schema.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from odin_engine.loading import load_model
from odin_engine.models.cifar_resnet import CifarResNet
from odin_engine.scorer import OdinScorer

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def shared_data() -> Path:
    """``../shared/data`` relative to the repository root."""
    return SHARED_DATA.resolve()


def random_weights(path: Path, seed: int = 0) -> Path:
    """A randomly initialized ResNet-20 whose head is standardized on smooth images, so that
    logits are moderate (a few units) and predictions spread over the classes."""
    torch.manual_seed(seed)
    net = CifarResNet(depth=20, num_classes=10).eval()
    x = torch.from_numpy(smooth_images(256, 999 + seed)).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        feat = net.layer3(net.layer2(net.layer1(torch.relu(net.bn1(net.conv1(x)))))).mean((2, 3))
        mu, sd = feat.mean(0), feat.std(0).clamp_min(1e-3)
        w = torch.randn(10, 64) * 0.4 / sd
        net.linear.weight.copy_(w)
        net.linear.bias.copy_(-(w @ mu))
    torch.save(net.state_dict(), path)
    return path


def tiny_model(tmp_path: Path, seed: int = 0):
    w = random_weights(tmp_path / f"rn20-random-{seed}.pt", seed)
    return load_model("cifar_resnet20", w), w


def smooth_images(n: int, seed: int) -> np.ndarray:
    """Natural-ish images: smooth colour gradients plus mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    base = rng.uniform(0, 1, (n, 1, 1, 3)) * 0.6 + 0.2
    tilt = rng.uniform(-0.3, 0.3, (n, 1, 1, 2))
    img = base + tilt[..., :1] * xx[None, :, :, None] + tilt[..., 1:] * yy[None, :, :, None]
    img = img + rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def noise_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def score_frame(model, images: np.ndarray, temperature: float = 1000.0, epsilon: float = 0.0014,
                prefix: str = "img", split: str | None = None, errors: int = 0) -> pd.DataFrame:
    """Rows in the score job's schema; the last ``errors`` rows are turned into status='error'."""
    s = OdinScorer(model, temperature=temperature, epsilon=epsilon, device="cpu", batch_size=64).score(images)
    n = len(images)
    df = pd.DataFrame({
        "image_id": [f"{prefix}-{i:05d}" for i in range(n)],
        "uri": [f"/nonexistent/{prefix}-{i:05d}.png" for i in range(n)],
        "status": "ok",
        "error": None,
        "width": 32, "height": 32,
        "pred": s["pred"].astype("int64"),
        "msp": s["msp"], "max_logit": s["max_logit"], "energy": s["energy"], "odin": s["odin"],
        "temperature": float(temperature), "epsilon": float(epsilon),
        "model_id": model.model_id, "run_id": uuid.uuid4().hex[:12],
        "scored_at": datetime.now(timezone.utc).isoformat(),
        "label": None, "split": split,
    })
    if errors:
        idx = df.index[-errors:]
        for c in ("pred", "msp", "max_logit", "energy", "odin", "width", "height"):
            df[c] = df[c].astype("float64")
            df.loc[idx, c] = np.nan
        df.loc[idx, "status"] = "error"
        df.loc[idx, "error"] = "cannot identify image file"
    return df


def write_scores(df: pd.DataFrame, out_dir: Path, parts: int = 2) -> Path:
    d = Path(out_dir) / "scores"
    d.mkdir(parents=True, exist_ok=True)
    for i, chunk in enumerate(np.array_split(np.arange(len(df)), parts)):
        df.iloc[chunk].to_parquet(d / f"part-{i:03d}.parquet", index=False)
    return Path(out_dir)

"""The command line: one definition per shared option, `--help` and `--version` without torch or Ray,
`NAME=SRC` parsing, and `tune`'s progress lines (silent with `--quiet`)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _odin_helpers import noise_images, smooth_images, tiny_model
from jobs import options
from jobs.cli import COMMANDS, main as cli
from odin_engine.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray")


def _parser(command: str) -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog=f"odin-audit {command}")
    importlib.import_module(COMMANDS[command]).build_parser(parser)
    return parser


@pytest.mark.parametrize("command", [*COMMANDS, None])
def test_help_and_version_answer_without_importing_torch_or_ray(command):
    """`odin-audit CMD --help` / `--version` build the parser only: no torch or Ray import."""
    argv = [command] if command else []
    code = (
        "import sys, contextlib, io\n"
        "from jobs.cli import main\n"
        "out = {}\n"
        "for flag in ('--help', '--version'):\n"
        "    buf = io.StringIO()\n"
        "    with contextlib.redirect_stdout(buf):\n"
        "        try:\n"
        f"            rc = main({argv!r} + [flag])\n"
        "        except SystemExit as exc:\n"
        "            rc = exc.code\n"
        "    out[flag] = (rc, buf.getvalue())\n"
        f"heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "print(repr((out, heavy)))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out, heavy = eval(p.stdout.strip().splitlines()[-1])  # noqa: S307 - our own repr
    assert heavy == [], f"--help/--version imported {heavy}"
    rc, text = out["--help"]
    assert rc in (0, None)
    assert ("usage: odin-audit " + (command or "<command>")) in text
    rc, text = out["--version"]
    from odin_engine import __version__

    assert rc in (0, None) and text.strip() == f"odin-audit {__version__}"


def test_the_console_script_answers_help_and_version():
    exe = Path(sys.executable).parent / "odin-audit"
    if not exe.exists():
        pytest.skip("the odin-audit console script is not installed in this environment")
    p = subprocess.run([str(exe), "score", "--help"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0 and "--input" in p.stdout and "--resize {crop,stretch}" in p.stdout, p.stderr
    p = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0 and p.stdout.startswith("odin-audit "), p.stderr


def _signature(action: argparse.Action) -> tuple:
    return (action.dest, action.type, action.default, tuple(action.choices or ()), action.nargs, action.help,
            type(action).__name__)


SHARED = ["--model", "--weights", "--mean", "--std", "--input-size", "--unsafe-pickle", "--temperature", "--epsilon",
          "--tuning", "--tpr", "--method", "--batch-size", "--workers", "--resize", "--ray-address", "--config",
          "--shard-rows", "--object-store-mib", "--table-format", "--fit", "--head"]


@pytest.mark.parametrize("flag", SHARED)
def test_a_shared_option_means_the_same_in_every_command(flag):
    """Each shared flag is one definition (jobs/options.py): same type, default, choices and help everywhere.

    Exceptions are deliberate and listed: tune's --temperature is the fixed T of its id-only mode, the
    demo's T/ε are its own fixed defaults, --tpr's help names what δ keeps in each context, and audit's
    --tpr/--method default to None so that a value given beside --calibration can be told apart (and
    checked against the frozen file); without --calibration they fall back to the same 0.95 / odin.
    calibrate's --method defaults to None so that --tuning's chosen method applies unless --method is
    given (its --tuning sets only the method: its scores are already made); fit's --temperature/--tuning set
    only T (AdaSCALE's shared gradient), there is no ε."""
    deliberate = {("tune", "--temperature"), ("demo", "--temperature"), ("demo", "--epsilon"),
                  ("audit", "--tpr"), ("audit", "--method"),
                  ("fit", "--temperature"), ("fit", "--tuning"), ("calibrate", "--tuning")}
    seen = {}
    for command in COMMANDS:
        actions = {s: a for a in _parser(command)._actions for s in a.option_strings}
        if flag in actions and (command, flag) not in deliberate:
            sig = _signature(actions[flag])
            if flag == "--tpr":
                sig = sig[:5]
            seen[command] = sig
    assert seen, f"no command takes {flag}"
    assert len(set(seen.values())) == 1, seen


def test_score_and_audit_take_the_same_model_and_execution_options():
    flags = lambda c: {s for a in _parser(c)._actions for s in a.option_strings}  # noqa: E731
    common = {"--model", "--weights", "--mean", "--std", "--input-size", "--unsafe-pickle", "--temperature",
              "--epsilon", "--tuning", "--batch-size", "--workers", "--resize", "--ray-address", "--quiet",
              "--shard-rows", "--object-store-mib", "--table-format"}
    assert common <= flags("score") and common <= flags("audit")
    assert {"--model", "--resize", "--batch-size", "--quiet", "--unsafe-pickle"} <= flags("tune")


def test_named_sources():
    p = options.parse_named_sources
    assert p(["svhn=/data/svhn", "/data/lsun.npz[0:10]", "s3://b/k=v/x.csv"]) == [
        ("svhn", "/data/svhn"), ("lsun", "/data/lsun.npz[0:10]"), ("x", "s3://b/k=v/x.csv")]
    assert p(None) == [] and p([]) == []
    with pytest.raises(ConfigError, match="NAME=SRC"):
        p(["/data/svhn"], require_name=True)
    with pytest.raises(ConfigError, match="must differ"):
        p(["a/x.npz", "b/x.npz"])
    with pytest.raises(ConfigError, match="reserved"):
        p(["heldout=/d"], reserved=("heldout", "corpus"))
    assert p(["a b=c"]) == [("a_b_c", "a b=c")]  # not a name: a bare source, named after its file


@pytest.fixture(scope="module")
def tune_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune-cli")
    _, weights = tiny_model(tmp)
    np.savez(tmp / "id.npz", images=smooth_images(24, 5))
    np.savez(tmp / "ood.npz", images=noise_images(16, 6))
    return tmp, weights


@pytest.mark.parametrize("quiet", [False, True])
def test_tune_reports_progress_unless_quiet(tune_files, quiet, capsys):
    tmp, weights = tune_files
    out = tmp / f"tuning-{quiet}.json"
    argv = ["tune", "--heldout", str(tmp / "id.npz"), "--ood", f"noise={tmp / 'ood.npz'}", "--model", "cifar_resnet20",
            "--weights", str(weights), "--temperatures", "1,1000", "--epsilons", "0,0.004", "--batch-size", "8",
            "--output", str(out), *(["--quiet"] if quiet else [])]
    assert cli(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1].startswith("paper: method ") and out.is_file()
    doc = json.loads(out.read_text())
    assert doc["method"] in doc["comparison"]["best"] and "FPR at 95% TPR" in captured.out  # the method table
    assert (doc["sources"]["heldout"]["n"], doc["sources"]["ood"]["noise"]["n"]) == (24, 16)
    lines = [line for line in captured.err.splitlines() if line.startswith("[tune")]
    if quiet:
        assert lines == [], captured.err
    else:
        text = "\n".join(lines)
        for stage in ("loading model cifar_resnet20", "reading and decoding held-out", "reading and decoding OOD noise",
                      "scoring held-out: 24 images × 2 T × 2 ε", "held-out: 24/24 images",
                      "scoring OOD noise: 16 images", "OOD noise: 16/16 images"):
            assert stage in text, text


def test_tune_progress_scoring_equals_the_scorers_own_grid(tune_files):
    """tune reports progress by scoring one batch and one T at a time: the grid must be the same."""
    from jobs.tune import _GridWithProgress, _Progress
    from odin_engine.loading import load_model
    from odin_engine.scorer import OdinScorer

    tmp, weights = tune_files
    imgs = np.load(tmp / "id.npz")["images"]
    scorer = OdinScorer(load_model("cifar_resnet20", weights), device="cpu", batch_size=10)
    temps, eps = [1.0, 20.0, 1000.0], [0.0, 0.002]
    lines = []
    progress = _Progress(quiet=False, every_s=0.0, emit=lines.append)  # a line at every step
    got = _GridWithProgress(scorer, {id(imgs): "held-out"}, progress).score_grid(imgs, temps, eps)
    want = scorer.score_grid(imgs, temps, eps)
    np.testing.assert_array_equal(got["pred"], want["pred"])
    np.testing.assert_allclose(got["odin"], want["odin"], rtol=1e-6)
    np.testing.assert_allclose(got["msp"], want["msp"], rtol=1e-6)
    assert len(lines) == 2 + 3 * 3  # start, one per (batch of 10, T) over 24 images, end
    assert "held-out: images 21–24 of 24, T=1000 (3/3)" in lines[-2] and "held-out: 24/24 images in " in lines[-1]

"""README.md stays true: the quick start, every command line's options, every file it points to.

The Python recipes and the demo follow-up commands are *run* by tests/test_demo.py on a real demo
output; the deploy commands by tests/test_deploy.py. Here: commands that need infrastructure the
tests do not have (an S3 bucket, a cluster, kubectl, docker) are checked against the parsers of
the commands they call, so a renamed or removed option fails the suite.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
VENV_BIN = Path(sys.executable).parent


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def tagged_block(tag: str, lang: str) -> list[str]:
    return re.findall(rf"<!-- tested: {tag} -->\n```{lang}\n(.*?)```", README, re.S)


def command_lines() -> list[str]:
    lines = []
    for b in blocks("bash"):
        for line in b.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _parser(module: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    importlib.import_module(module).build_parser(p)
    return p


def _project_invocations(line: str) -> list[tuple[str, list[str]]]:
    """(module, tokens after it) for each `odin-audit CMD …` / `python -m jobs.CMD …` in a line."""
    from jobs.cli import COMMANDS

    toks = [t.strip("[]") for t in shlex.split(line)]
    out = []
    for i, t in enumerate(toks):
        if Path(t).name == "odin-audit" and i + 1 < len(toks):
            assert toks[i + 1] in COMMANDS, f"README: unknown command `odin-audit {toks[i + 1]}` in: {line}"
            out.append((COMMANDS[toks[i + 1]], toks[i + 2:]))
        elif t == "-m" and i + 1 < len(toks) and toks[i + 1].startswith("jobs."):
            out.append((toks[i + 1], toks[i + 2:]))
    return out


def test_quick_start_is_exactly_two_self_setting_up_commands():
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    first = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    assert first.split() == ["./scripts/demo", "./scripts/test"]
    for script in ("scripts/demo", "scripts/test"):
        text = (REPO / script).read_text()
        assert "scripts/setup" in text, f"{script} must set itself up"
        assert (REPO / script).stat().st_mode & 0o111, f"{script} must be executable"
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^\./scripts/test\b", ci, re.M), ".ci/run must call ./scripts/test"


def test_scripts_demo_runs():
    p = subprocess.run([str(REPO / "scripts" / "demo"), "--help"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "usage: odin-audit demo" in p.stdout


def test_every_command_line_uses_real_commands_and_options():
    checked = 0
    for line in command_lines():
        for module, rest in _project_invocations(line):
            known = {o for a in _parser(module)._actions for o in a.option_strings}
            for tok in rest:
                if tok.startswith("--"):
                    flag = tok.split("=", 1)[0]
                    assert flag in known, f"README: `{flag}` is not an option of {module}, in: {line}"
            checked += 1
    assert checked >= 8, checked


def test_ray_and_kubectl_lines_point_at_real_things():
    ray_flags = set()
    for line in command_lines():
        toks = shlex.split(line)
        if "ray" in [Path(t).name for t in toks[:1]] and toks[1:3] == ["job", "submit"]:
            ray_flags |= {t for t in toks[3:toks.index("--")] if t.startswith("--")}
        for t in toks:
            if t.startswith(("deploy/", "scripts/", "audit.toml=deploy/")) or "=deploy/" in t:
                path = t.rsplit("=", 1)[-1]
                assert (REPO / path).exists(), f"README mentions {path}, which does not exist"
    if ray_flags:
        p = subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--help"], capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0
        for flag in ray_flags:
            assert flag in p.stdout, f"`ray job submit` has no {flag}"


def test_links_and_paths_exist():
    missing = []
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if "://" not in target and not (REPO / target).exists():
            missing.append(target)
    for path in re.findall(r"`((?:odin_engine|jobs|deploy|scripts|docs|tests|benchmarks)/[\w./-]+)`", README):
        if not (REPO / path).exists():
            missing.append(path)
    assert not missing, f"README points at missing files: {missing}"


def test_tagged_blocks_exist():
    assert len(tagged_block("demo-output", "python")) == 2
    assert len(tagged_block("demo-followup", "bash")) == 1


@pytest.mark.parametrize("code", blocks("python"), ids=lambda c: c.strip().splitlines()[0][:40])
def test_python_blocks_compile(code):
    compile(code, "README.md", "exec")


def test_readme_factory_example_wraps_a_torchscript_model(tmp_path, monkeypatch):
    """The "bring your own model" factory, as written in the README, around a real TorchScript archive."""
    import numpy as np
    import torch

    from odin_engine import OdinScorer, load_model
    from odin_engine.demo.model import DemoCNN

    code = next(b for b in blocks("python") if "def build():" in b and "torch.jit.load" in b)
    torch.manual_seed(0)
    torch.jit.script(DemoCNN().eval()).save(str(tmp_path / "model.ts"))
    (tmp_path / "mymodels.py").write_text(code)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    m = load_model("mymodels:build")
    assert (m.mean, m.std, m.input_size, m.num_classes) == (
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 32, 10)
    images = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    out = OdinScorer(m, temperature=1000.0, epsilon=0.0014, device="cpu").score(images)
    assert out["odin"].shape == (4,) and np.isfinite(out["odin"]).all()

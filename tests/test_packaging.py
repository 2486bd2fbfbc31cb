"""pyproject.toml builds a wheel of lingua and apps (configs included) whose metadata pins the
torch that requirements.txt pins, with the [dev], [hf] and [eval] extras."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser

import pytest

from tests.conftest import ROOT


def requirement_names(lines: list[str]) -> set[str]:
    names = set()
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            names.add(line.split(";")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower())
    return names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("setuptools")
    out, src = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("src")
    # A copy: setuptools writes build/ and *.egg-info next to pyproject.toml.
    for name in ("pyproject.toml", "README.md", "requirements.txt"):
        shutil.copy(ROOT / name, src / name)
    for package in ("lingua", "apps"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("lingua_memory-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_holds_the_packages_and_the_configs(wheel):
    names = set(wheel.namelist())
    for f in ("lingua/hf.py", "lingua/product_key/memory.py", "apps/main/train.py", "apps/main/harness.py",
              "apps/plots/__main__.py", "apps/main/configs/debug.yaml", "apps/bench/recall.py"):
        assert f in names, f
    assert not any(n.startswith(("tests/", "setup/")) for n in names)


def test_wheel_pins_torch_and_lists_every_requirement_in_core_or_an_extra(wheel):
    (meta,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    requires = Parser().parsestr(wheel.read(meta).decode()).get_all("Requires-Dist")
    assert "torch==2.13.0" in requires
    extras = {e: [r for r in requires if f'extra == "{e}"' in r] for e in ("dev", "hf", "eval")}
    assert any(r.startswith("pytest") for r in extras["dev"])
    assert {"transformers", "peft", "datasets", "safetensors"} <= requirement_names(extras["hf"])
    assert {"lm-eval", "rouge-score"} <= requirement_names(extras["eval"])
    listed = requirement_names((ROOT / "requirements.txt").read_text().splitlines())
    assert listed <= requirement_names(requires), listed - requirement_names(requires)

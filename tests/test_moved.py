"""Import paths from before ``seg/model``, ``seg/train`` and ``seg/serve``: users' YAML class paths, scripts,
``python -m`` commands and pickled checkpoints keep working, each with a message naming the new path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import seg  # noqa: F401  (installs the finder)
from seg import _moved
from seg.model.inference import InferenceConfig

ROOT = Path(__file__).parents[1]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_every_old_module_is_its_new_module_with_a_message() -> None:
    code = ("import warnings, importlib\n"
            "from seg._moved import MOVED\n"
            "for old, new in MOVED.items():\n"
            "    with warnings.catch_warnings(record=True) as caught:\n"
            "        warnings.simplefilter('always')\n"
            "        a = importlib.import_module(old)\n"
            "    assert a is importlib.import_module(new), old\n"
            "    assert any(new in str(w.message) and w.category is FutureWarning for w in caught), old\n"
            "import seg.layers.focused_linear as a, seg.model.layers.focused_linear as b\n"
            "assert a is b and b.__spec__.name == 'seg.model.layers.focused_linear'\n"
            "from seg.models import Segmentor\n"
            "from seg.model import Segmentor as S\n"
            "assert Segmentor is S\n"
            "print('ok')\n")
    done = run("-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_new_names_cover_submodules_and_nothing_else() -> None:
    assert _moved.new_name("seg.backbones.pvt") == "seg.model.backbones.pvt"
    assert _moved.new_name("seg.callbacks.report") == "seg.train.callbacks.report"
    assert _moved.new_name("seg.checkpoint_io") == "seg.train.checkpoint_io"  # not seg.checkpoint + "_io"
    assert _moved.new_name("seg.data.spec") is None and _moved.new_name("seg.kernels") is None
    assert _moved.new_name("seg.modelsx") is None
    missing = run("-c", "import seg.backbones.no_such_module")
    assert missing.returncode != 0 and "No module named 'seg.backbones.no_such_module'" in missing.stderr


def test_an_old_yaml_class_path_still_parses_and_names_the_new_one(tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config["model"]["model"]["class_path"] = "seg.models.Segmentor"
    config["model"]["scheduler"]["class_path"] = "seg.schedules.WarmupPolyLR"
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(config))
    done = run("cli.py", "fit", "--config", str(old), "--print_config")
    assert done.returncode == 0, done.stderr
    assert "seg.models moved to seg.model.segmentor" in done.stderr
    assert "seg.schedules moved to seg.train.schedules" in done.stderr
    printed = yaml.safe_load(done.stdout)
    assert printed["model"]["model"]["init_args"]["encoder"] == "flatten_pvt_v2_b0"


def test_an_old_command_path_runs_the_new_command() -> None:
    done = run("-m", "seg.convert", "--help")
    assert done.returncode == 0, done.stderr
    assert "seg.convert moved to seg.model.convert" in done.stderr
    assert "--config" in done.stdout and "--out" in done.stdout


@pytest.mark.skipif(torch.torch_version.TorchVersion(torch.__version__) < (2, 6),
                    reason="torch < 2.6 cannot allow a class under a second path in weights_only loads")
def test_a_checkpoint_pickled_under_the_old_path_loads_safely(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "old.ckpt"
    monkeypatch.setattr(InferenceConfig, "__module__", "seg.inference")  # as checkpoints before the move pickled it
    torch.save({"hyper_parameters": {"inference": InferenceConfig(mode="slide")}}, path)
    monkeypatch.undo()
    assert b"seg.inference" in path.read_bytes()
    loaded = torch.load(path, weights_only=True)["hyper_parameters"]["inference"]
    assert type(loaded) is InferenceConfig and loaded.mode == "slide"

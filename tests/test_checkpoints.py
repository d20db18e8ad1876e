"""Lightning checkpoints: load_from_checkpoint refuses forged instantiators (Lightning >= 2.6.6) and rebuilds the
task from a checkpoint `cli.py fit` wrote; forged inference settings are refused after loading (both readers); a run
without a logger; predicting with the demo config writes no data."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from _specs import DEMO_SMALL, spec_arg
from PIL import Image

from seg.data import make_demo_dataset
from seg.model.checkpoint import read_checkpoint
from seg.model.inference import InferenceConfig
from seg.model.segmentor import Segmentor
from seg.train.cli import cli_main
from seg.train.task import SegmentationTask

CONFIGS = Path(__file__).parents[1] / "configs"
MARKER = "code_ran.txt"


def _payload(cls: type, kwargs: dict) -> None:
    """What a forged checkpoint asks Lightning to run: it leaves a file behind if it ever runs."""
    Path(kwargs["marker"]).write_text("ran")


class Payload:
    def __init__(self, marker: str, **kwargs) -> None:
        Path(marker).write_text("ran")


def forged(tmp_path: Path, hparams: dict) -> Path:
    path = tmp_path / "forged.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {**hparams, "marker": str(tmp_path / MARKER)},
                "pytorch-lightning_version": pl.__version__}, path)
    return path


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ({"_instantiator": f"{__name__}._payload"}, "not in the allowlist of trusted instantiators"),
        ({"_instantiator": "pytorch_lightning.cli.instantiate_module", "_class_path": f"{__name__}.Payload"},
         "does not resolve to an already imported subclass of SegmentationTask"),
    ],
    ids=["instantiator", "class_path"],
)
def test_forged_checkpoint_is_refused(tmp_path: Path, hparams: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SegmentationTask.load_from_checkpoint(forged(tmp_path, hparams), weights_only=True)
    assert not (tmp_path / MARKER).exists()


def demo_args(root: Path) -> list[str]:
    """The demo config on a tiny model, data set and image size."""
    return [
        "--config", str(CONFIGS / "demo.yaml"), "--model.model.init_args.encoder=test_flatten_pvt_v2",
        f"--data.root={root}", "--data.crop_size=64", "--data.batch_size=2", "--data.num_workers=0",
        "--data.train_scale=[128, 64]", spec_arg(DEMO_SMALL),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`cli.py fit` of the demo config for 2 steps with `--trainer.logger false`, in its own folder."""
    folder = tmp_path_factory.mktemp("run")
    root = make_demo_dataset(folder / "tiny", num_train=2, num_val=1, min_size=64, max_size=72)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        cli_main(["fit", *demo_args(root), "--data.demo=false", "--trainer.logger=false", "--trainer.max_steps=2",
                  "--trainer.val_check_interval=2", "--trainer.num_sanity_val_steps=0"])
    return folder


def test_fit_without_a_logger(run: Path) -> None:
    checkpoint = torch.load(run / "logs" / "demo" / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2
    assert not (run / "logs" / "demo" / "version_0").exists()  # no CSV / TensorBoard logs


def test_load_from_checkpoint_rebuilds_the_task(run: Path) -> None:
    path = run / "logs" / "demo" / "checkpoints" / "best.ckpt"
    task = SegmentationTask.load_from_checkpoint(path, weights_only=True)
    assert isinstance(task.model, Segmentor) and task.model.arguments["encoder"] == "test_flatten_pvt_v2"
    assert task.model.num_classes == 12 and task.model.arguments["decoder"] == "fpn"
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    for name, tensor in task.state_dict().items():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0)
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        assert task.eval()(x).shape == (1, 12, 64, 80)


@pytest.mark.parametrize(("field", "value"), [("stride", 0), ("crop_size", -64), ("crop_size", (64, 0))])
def test_forged_inference_settings_are_refused(run: Path, tmp_path: Path, field: str, value: object) -> None:
    """An InferenceConfig unpickled from a checkpoint skips ``__post_init__``: its settings are checked after
    loading, and a forged one is refused naming the field and the file."""
    checkpoint = torch.load(run / "logs" / "demo" / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    settings = InferenceConfig(mode="slide")
    setattr(settings, field, value)  # what unpickling a forged file produces: no checks ran
    checkpoint["hyper_parameters"]["inference"] = settings
    path = tmp_path / "forged.ckpt"
    torch.save(checkpoint, path)
    for load in (read_checkpoint, lambda f: SegmentationTask.load_from_checkpoint(f, weights_only=True)):
        message = f"{path}: hyper_parameters.inference: {field} must be a positive int or (h, w) pair of them, " \
                  f"got {value!r}"
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            load(path)


def test_predict_with_the_demo_config_writes_no_data_set(run: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(photos / "a.png")
    monkeypatch.chdir(tmp_path)
    args = [*demo_args(Path("data/demo")), "--data.demo=true"]  # the demo config as it is: root data/demo, demo true
    cli_main(["predict", *args, "--config", str(CONFIGS / "predict.yaml"), f"--data.predict_root={photos}",
              f"--ckpt_path={run / 'logs' / 'demo' / 'checkpoints' / 'best.ckpt'}", "--trainer.logger=false"])
    assert np.asarray(Image.open(tmp_path / "predictions" / "a.png")).shape == (50, 70)
    assert not (tmp_path / "data").exists()

"""torch.compile switch of the task: the training forward compiled with static shapes, evaluation eager at each
image's own size, same outputs, same checkpoint keys (slow: inductor)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import seg.kernels.onednn as onednn
from seg.data import make_demo_dataset
from seg.model.segmentor import Segmentor
from seg.train.cli import cli_main
from seg.train.task import SegmentationTask

pytestmark = pytest.mark.slow


def test_compiled_training_step_equals_eager_and_keeps_checkpoint_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eager runs what the compiler traces (the reference attention, F.linear). The losses agree to 1e-3: the
    compiler reorders sums, and the training-mode batch norms of a 2-image batch on 2 x 2 maps amplify that
    rounding (3e-4 measured)."""
    monkeypatch.setattr(onednn, "_switched_on", False)
    torch.manual_seed(0)
    model = Segmentor("test_flatten_pvt", "semantic_fpn", num_classes=4, decoder_channels=16, aux_head=False,
                      encoder_kwargs={"attn_backend": "reference"})
    for module in model.modules():  # compiled dropout draws other masks: compare without it (channel dropout too)
        if isinstance(module, torch.nn.Dropout | torch.nn.Dropout2d):
            module.p = 0.0
    task = SegmentationTask(model, compile=True)
    keys = list(task.state_dict())
    batch = {"image": torch.randn(2, 3, 64, 64), "mask": torch.randint(0, 4, (2, 64, 64))}
    eager = task.training_step(batch, 0)
    task.configure_model()
    assert task._train_forward is not None
    compiled = task.training_step(batch, 0)
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-5)
    assert list(task.state_dict()) == keys


def test_compiled_fit_validates_images_of_varying_sizes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's path with ``--model.compile true``: training at one crop size, then validation on images
    of several sizes (the case that crashed inside dynamo when the whole segmentor was compiled)."""
    root = make_demo_dataset(tmp_path / "demo", num_train=4, num_val=3, min_size=64, max_size=128)
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).parents[1] / "configs" / "demo.yaml"
    cli = cli_main([
        "fit", "--config", str(config), "--model.compile=true", f"--data.root={root}", "--data.num_workers=0",
        "--data.crop_size=64", "--data.batch_size=2", "--trainer.max_steps=4", "--trainer.val_check_interval=2",
        "--trainer.num_sanity_val_steps=0", "--checkpoint.dirpath=ckpt",
    ])
    assert cli.trainer.global_step == 4
    assert cli.model._train_forward is not None
    scores = cli.model.last_scores["val"]
    assert 0.0 <= float(scores["mIoU"]) <= 1.0

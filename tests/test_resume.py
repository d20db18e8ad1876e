"""Resume and reproducibility: crash + ``ckpt_path='last'``, bit-identical resume from epoch boundaries,
identical runs with DataLoader workers, atomic checkpoint files, and the kill -9 script."""

from __future__ import annotations

import functools
import io
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from _specs import DEMO_SMALL
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from seg.data import DEMO_CLASS_NAMES, SegmentationDataModule, make_demo_dataset
from seg.model.segmentor import Segmentor
from seg.train.callbacks.seed_each_epoch import SeedEachEpoch
from seg.train.checkpoint_io import AtomicCheckpointIO
from seg.train.schedules import WarmupPolyLR
from seg.train.task import SegmentationTask

REPO = Path(__file__).parents[1]
NUM_CLASSES = len(DEMO_CLASS_NAMES)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 4 training images at batch 2: an epoch is 2 optimizer steps
    return make_demo_dataset(tmp_path_factory.mktemp("data") / "demo", num_train=4, num_val=2, min_size=64, max_size=96)


def make_task() -> SegmentationTask:
    model = Segmentor("test_flatten_pvt", decoder="semantic_fpn", num_classes=NUM_CLASSES, aux_head=False,
                      decoder_channels=32)
    return SegmentationTask(model, optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
                            scheduler=functools.partial(WarmupPolyLR, power=0.9, max_steps=100))


def make_data(root: Path, num_workers: int = 0) -> SegmentationDataModule:
    return SegmentationDataModule(str(root), crop_size=64, batch_size=2, num_workers=num_workers,
                                  spec=DEMO_SMALL, train_scale=(128, 64))


def fit(root: Path, max_steps: int, callbacks: list[Callback], ckpt_path: str | Path | None = None,
        validate: bool = False, num_workers: int = 0, seed: int = 0) -> tuple[pl.Trainer, SegmentationTask]:
    """A seeded CPU fit of the tiny FLatten-PVT segmentor; checkpoints only where ``callbacks`` ask for them."""
    pl.seed_everything(seed)
    task = make_task()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_checkpointing=any(isinstance(cb, ModelCheckpoint) for cb in callbacks),
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1 if validate else 0,
        callbacks=callbacks, plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(task, datamodule=make_data(root, num_workers), ckpt_path=ckpt_path)
    return trainer, task


def assert_same_weights(a: SegmentationTask, b: SegmentationTask) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.isfinite(t).all() for t in sa.values() if t.is_floating_point())
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def lrs(trainer: pl.Trainer) -> list[float]:
    return [group["lr"] for group in trainer.optimizers[0].param_groups]


class CrashAt(Callback):
    """Simulate a crash (preemption) after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated preemption")


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


# ----------------------------------------------------------------------------------------------------- resume


def test_crash_then_resume_last_matches_uninterrupted(demo_root: Path, tmp_path: Path) -> None:
    def checkpoints(folder: Path) -> ModelCheckpoint:
        return ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_top_k=-1, save_last=True)

    straight, straight_task = fit(demo_root, 6, [checkpoints(tmp_path / "a"), SeedEachEpoch()])
    with pytest.raises(RuntimeError, match="simulated preemption"):
        fit(demo_root, 6, [checkpoints(tmp_path / "b"), SeedEachEpoch(), CrashAt(3)])
    assert torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert not list((tmp_path / "b").glob("*.tmp"))  # atomic writes leave no partial files
    resumed, resumed_task = fit(demo_root, 6, [checkpoints(tmp_path / "b"), SeedEachEpoch()], ckpt_path="last")
    assert resumed.global_step == straight.global_step == 6
    assert resumed.current_epoch == straight.current_epoch == 3
    assert lrs(resumed) == lrs(straight) and lrs(straight)[0] == pytest.approx(1e-3 * (1 - 6 / 100) ** 0.9)
    scheduler_a = straight.lr_scheduler_configs[0].scheduler
    scheduler_b = resumed.lr_scheduler_configs[0].scheduler
    assert scheduler_b.last_epoch == scheduler_a.last_epoch == 6
    assert_same_weights(straight_task, resumed_task)  # step 2 ends epoch 0: an epoch-boundary resume


@pytest.mark.parametrize("seeded", [True, False], ids=["seed-each-epoch", "global-seed-only"])
def test_resume_after_epoch_end_validation_is_bit_identical(demo_root: Path, tmp_path: Path, seeded: bool) -> None:
    def callbacks(folder: Path) -> list[Callback]:
        saver = ModelCheckpoint(dirpath=folder, filename="{epoch}", save_top_k=-1, save_on_train_epoch_end=False)
        return [saver, SeedEachEpoch()] if seeded else [saver]

    straight, straight_task = fit(demo_root, 8, callbacks(tmp_path / "a"), validate=True)
    boundary = tmp_path / "a" / "epoch=1.ckpt"  # written after the validation that ends epoch 1 (step 4)
    resumed, resumed_task = fit(demo_root, 8, callbacks(tmp_path / "b"), ckpt_path=boundary, validate=True)
    assert resumed.global_step == straight.global_step == 8
    if seeded:
        assert_same_weights(straight_task, resumed_task)
    else:  # without per-epoch seeding the resumed run draws other crops, flips and dropout masks
        sa, sb = straight_task.state_dict(), resumed_task.state_dict()
        assert max((sa[k].float() - sb[k].float()).abs().max() for k in sa) > 1e-4


def test_identical_runs_with_workers(demo_root: Path) -> None:
    runs = []
    for seed in (0, 0, 1):
        recorder = LossRecorder()
        fit(demo_root, 3, [recorder], num_workers=2, seed=seed)
        runs.append(recorder.losses)
    assert len(runs[0]) == 3
    assert runs[0] == runs[1]  # bit-identical losses: seed_everything + the loader's worker seeding
    assert runs[0] != runs[2]  # and the seed matters


# ------------------------------------------------------------------------------------------ atomic checkpoints


def test_atomic_save_failure_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.ckpt"
    io_plugin = AtomicCheckpointIO()
    io_plugin.save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs) -> None:
        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()
        if isinstance(f, (str, Path)):
            Path(f).write_bytes(data[: len(data) // 2])
        else:
            f.write(data[: len(data) // 2])
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io_plugin.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    kept = torch.load(path, weights_only=True)
    assert kept["step"] == 1 and torch.equal(kept["w"], torch.ones(1000))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the partial .tmp was removed

    naive = tmp_path / "naive.ckpt"  # the same fault on a plain torch.save(path) corrupts the file
    real_save({"step": 1}, naive)
    with pytest.raises(KeyboardInterrupt):
        dies_half_way({"step": 2, "w": torch.zeros(1000)}, naive)
    with pytest.raises(RuntimeError):
        torch.load(naive, weights_only=True)


KILL_WHILE_SAVING = """
import io, sys, time, torch
from seg.train.checkpoint_io import AtomicCheckpointIO
path = sys.argv[1]
AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(10000)}, path)
real_save = torch.save
def slow(obj, f, *args, **kwargs):
    buffer = io.BytesIO()
    real_save(obj, buffer)
    f.write(buffer.getvalue()[:20000])
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
torch.save = slow
AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.zeros(10000)}, path)
"""


def test_sigkill_while_saving_leaves_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    process = subprocess.Popen([sys.executable, "-c", KILL_WHILE_SAVING, str(path)], stdout=subprocess.PIPE,
                               text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        assert process.stdout.readline().strip() == "writing"
        assert (tmp_path / "last.ckpt.tmp").stat().st_size == 20000  # the new file is half written
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    kept = torch.load(path, weights_only=True)
    assert kept["step"] == 1 and torch.equal(kept["w"], torch.ones(10000))


# ---------------------------------------------------------------------------------------- kill -9 end to end


@pytest.mark.slow
def test_kill_and_resume_script(tmp_path: Path) -> None:
    script = REPO / "benchmarks" / "kill_and_resume.py"
    done = subprocess.run([sys.executable, str(script), "--steps", "8", "--every", "4", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "killed (exit status -9)" in done.stdout
    assert "step, epoch and learning rates equal: True; weights bit-identical: True" in done.stdout
    assert textwrap.dedent("| killed + resumed | 8 | 1 |") in done.stdout

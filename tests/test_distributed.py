"""Distributed correctness on CPU with gloo: ``python cli.py`` under 2-process DDP, an uneven validation split
scored exactly as by one process, two "nodes" of one process each on loopback, and the SyncBatchNorm guard."""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _specs import DEMO_SMALL, spec_arg

from seg.cli import cli_main
from seg.data import DEMO_CLASS_NAMES, make_demo_dataset

REPO = Path(__file__).parents[1]
EXPERIMENT = REPO / "configs" / "flatten_pvt_tiny_fpn_ade20k_80k.yaml"
CPU = REPO / "configs" / "trainer" / "cpu.yaml"
NUM_CLASSES = len(DEMO_CLASS_NAMES)
TIMEOUT = 240  # seconds per subprocess; the runs take 10-30 s


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 4 training images (one batch of 2 per process and step), 3 validation images: 2 processes split them 2 + 1
    return make_demo_dataset(tmp_path_factory.mktemp("data") / "demo", num_train=4, num_val=3, min_size=64, max_size=96)


def tiny_args(root: Path) -> list[str]:
    """The FLatten-PVT-T paper config composed with configs/trainer/cpu.yaml, shrunk to CPU size."""
    return [
        "--config", str(EXPERIMENT), "--config", str(CPU),
        "--model.model.init_args.encoder=test_flatten_pvt", "--model.model.init_args.encoder_checkpoint=null",
        f"--data.root={root}", spec_arg(DEMO_SMALL), "--data.crop_size=64", "--data.batch_size=2",
        "--data.num_workers=0", "--data.train_scale=[128, 64]",
        "--trainer.callbacks+=seg.callbacks.effective_batch.EffectiveBatch", "--trainer.callbacks.expected=16",
    ]


def cli_command(subcommand: str, root: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "cli.py"), subcommand, *tiny_args(root), *extra]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without launcher variables, one thread per process."""
    launcher = {"LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith(("PL_", "SLURM_"))}
    return env | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"} | extra


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_logged(metrics_csv: Path, keys: tuple[str, ...]) -> dict[str, float]:
    """The last logged value of each key in a CSVLogger metrics file."""
    values: dict[str, float] = {}
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            values |= {k: float(row[k]) for k in keys if row.get(k)}
    return values


def run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    cwd.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


def test_ddp_fit_and_uneven_validation_match_one_process(demo_root: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    output = run(
        cli_command("fit", demo_root, "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_steps=2",
                    "--trainer.val_check_interval=2", "--trainer.num_sanity_val_steps=0"),
        tmp_path / "ddp", clean_env(),
    )
    assert "2 devices x 1 nodes x 2 per-device batch x 1 accumulation = 4" in output
    logs = tmp_path / "ddp" / "logs"
    (last,) = logs.rglob("last.ckpt")
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2
    keys = ("val/mIoU", "val/mAcc", "val/aAcc")
    (metrics,) = logs.rglob("metrics.csv")
    two_processes = last_logged(metrics, keys)
    assert set(two_processes) == set(keys)

    def validate_one_process(root: Path, folder: str) -> dict[str, float]:
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        cli = cli_main(["validate", *tiny_args(root), f"--ckpt_path={last}"])
        return {f"val/{k}": float(v) for k, v in cli.model.last_scores["val"].items() if k in ("mIoU", "mAcc", "aAcc")}

    one_process = validate_one_process(demo_root, "one")
    assert two_processes == pytest.approx(one_process, abs=1e-6)

    # a padding DistributedSampler would score image 0 twice (ranks get [0, 2] and [1, 0]); that differs
    padded = tmp_path / "padded"
    shutil.copytree(demo_root, padded)
    first = sorted((padded / "images" / "validation").iterdir())[0]
    shutil.copy(first, first.with_name("zz_repeat" + first.suffix))
    label = padded / "annotations" / "validation" / f"{first.stem}.png"
    shutil.copy(label, label.with_name("zz_repeat.png"))
    repeated = validate_one_process(padded, "repeated")
    assert max(abs(repeated[k] - one_process[k]) for k in keys) > 1e-5


def test_two_nodes_on_loopback(demo_root: Path, tmp_path: Path) -> None:
    port = str(free_port())
    command = cli_command("fit", demo_root, "--trainer.strategy=ddp", "--trainer.devices=1",
                          "--trainer.num_nodes=2", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
                          "--trainer.num_sanity_val_steps=0")
    processes = []
    for node in (0, 1):
        env = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(node), WORLD_SIZE="2",
                        LOCAL_RANK="0")
        cwd = tmp_path / f"node{node}"
        cwd.mkdir()
        processes.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=TIMEOUT)[0])
    finally:
        for process in processes:
            process.kill()
    for node, (process, output) in enumerate(zip(processes, outputs, strict=True)):
        assert process.returncode == 0, f"node {node}:\n{output[-4000:]}"
        assert f"MEMBER: {node + 1}/2" in output  # global rank node of world size 2
    assert "1 devices x 2 nodes x 2 per-device batch x 1 accumulation = 4" in outputs[0]
    assert "`max_steps=2` reached" in outputs[0]


@pytest.mark.slow
def test_sync_batchnorm_under_cpu_ddp_is_explained(demo_root: Path, tmp_path: Path) -> None:
    command = cli_command("fit", demo_root, "--trainer.strategy=ddp", "--trainer.devices=2",
                          "--trainer.sync_batchnorm=true", "--trainer.max_steps=1",
                          "--trainer.callbacks+=seg.callbacks.sync_batchnorm.SyncBatchNormCheck")
    (tmp_path / "run").mkdir()
    done = subprocess.run(command, cwd=tmp_path / "run", env=clean_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode != 0
    assert "sync_batchnorm=true needs CUDA devices" in done.stdout + done.stderr

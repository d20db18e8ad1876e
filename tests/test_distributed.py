"""Distributed correctness on CPU with gloo: ``python cli.py`` under 2-process DDP, an uneven validation split
scored exactly as by one process, two "nodes" of one process each on loopback, and the SyncBatchNorm guard; and
the harness that keeps a stalled rank from blocking the run (tests/_ranks.py)."""

from __future__ import annotations

import csv
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
from _ranks import run_commands, run_ranks
from _specs import DEMO_SMALL, spec_arg

from seg.data import DEMO_CLASS_NAMES, make_demo_dataset
from seg.train.cli import cli_main

REPO = Path(__file__).parents[1]
EXPERIMENT = REPO / "configs" / "flatten_pvt_tiny_fpn_ade20k_80k.yaml"
CPU = REPO / "configs" / "trainer" / "cpu.yaml"
NUM_CLASSES = len(DEMO_CLASS_NAMES)
TIMEOUT = 240  # seconds per run (each rank's stack is printed when it is exceeded); the runs take 10-30 s


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
        "--trainer.callbacks+=seg.train.callbacks.effective_batch.EffectiveBatch", "--trainer.callbacks.expected=16",
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
    return run_commands([(command, cwd, env)], TIMEOUT)[0]


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
    runs = []
    for node in (0, 1):
        env = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(node), WORLD_SIZE="2",
                        LOCAL_RANK="0")
        runs.append((command, tmp_path / f"node{node}", env))
    outputs = run_commands(runs, TIMEOUT)
    for node, output in enumerate(outputs):
        assert f"MEMBER: {node + 1}/2" in output  # global rank node of world size 2
    assert "1 devices x 2 nodes x 2 per-device batch x 1 accumulation = 4" in outputs[0]
    assert "`max_steps=2` reached" in outputs[0]


@pytest.mark.slow
def test_sync_batchnorm_under_cpu_ddp_is_explained(demo_root: Path, tmp_path: Path) -> None:
    command = cli_command("fit", demo_root, "--trainer.strategy=ddp", "--trainer.devices=2",
                          "--trainer.sync_batchnorm=true", "--trainer.max_steps=1",
                          "--trainer.callbacks+=seg.train.callbacks.sync_batchnorm.SyncBatchNormCheck")
    with pytest.raises(pytest.fail.Exception, match="sync_batchnorm=true needs CUDA devices"):
        run(command, tmp_path / "run", clean_env())


def test_a_stalled_rank_fails_with_its_stack(tmp_path: Path) -> None:
    """Rank 1 never finishes: within the deadline (+ grace) the test fails showing where rank 1 waits."""
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failure:
        run_ranks("_ranks:wait_for_a_peer_that_never_comes", 2, tmp_path, 3)
    assert time.monotonic() - start < 30
    message = str(failure.value)
    assert "ranks [1] of 2 failed or stalled" in message and "rank 0" not in message
    assert "Timeout (0:00:03)!" in message and "in wait_for_a_peer_that_never_comes" in message


def test_a_stalled_launcher_fails_with_the_stacks_of_its_children(tmp_path: Path) -> None:
    """A launcher whose child never finishes (as Lightning's DDP launcher starts rank 1): both stacks, no hang."""
    child = "import time\ndef child_rank_waits():\n    time.sleep(3600)\nchild_rank_waits()"
    launcher = f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {child!r}])\ntime.sleep(3600)"
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failure:
        run_commands([([sys.executable, "-c", launcher], tmp_path, clean_env())], 10)  # both interpreters up
    assert time.monotonic() - start < 40
    message = str(failure.value)
    assert "did not finish within 10 s" in message
    # the stacks after the command line; the two processes dump at once, so their lines may interleave
    stacks = message.split("stacks of its processes:", 1)[1]
    assert "child_rank_waits" in stacks and "<module>" in stacks

"""Kill -9 a training run after its first checkpoint, resume it with ``--ckpt_path last``, compare with an
uninterrupted run.

Three ``python cli.py fit`` processes on a tiny synthetic ADE20K-layout folder (the FLatten-PVT-T + Semantic
FPN paper config, shrunk to the ``test_flatten_pvt`` encoder and 64-pixel crops, composed with
``configs/trainer/cpu.yaml``):

1. uninterrupted: ``max_steps`` steps;
2. killed: the same command, sent SIGKILL as soon as its first ``last.ckpt`` appears;
3. resumed: the same command plus ``--ckpt_path last``.

Checkpoints are written every ``--every`` optimizer steps into a fixed folder (atomically, by
``seg.train.checkpoint_io.AtomicCheckpointIO``), with ``seg.train.callbacks.seed_each_epoch.SeedEachEpoch`` making each
epoch's randomness a function of (seed, epoch). The final checkpoints of runs 1 and 3 are compared: optimizer step,
epoch, learning rate (optimizer and scheduler) and every weight. With ``--every`` a multiple of the epoch length
(the default) the resume point is an epoch boundary and the weights must match bit for bit; otherwise
Lightning restarts the interrupted epoch's data order and only the counters and the learning rate match.
Exit status 0 when everything that must match does.

    python benchmarks/kill_and_resume.py [--steps 12] [--every 4] [--num-train 8] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "configs" / "flatten_pvt_tiny_fpn_ade20k_80k.yaml"
TRAINER = REPO / "configs" / "trainer" / "cpu.yaml"
BATCH = 2  # images per step (one CPU process)

OVERLAY = """\
# kill-and-resume: checkpoints every {every} steps into one fixed folder, no validation, no loggers
trainer:
  logger: false
  enable_progress_bar: false
  limit_val_batches: 0
  num_sanity_val_steps: 0
  plugins:
    - class_path: seg.train.checkpoint_io.AtomicCheckpointIO
  callbacks:
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args:
        dirpath: {checkpoints}
        filename: step{{step}}
        auto_insert_metric_name: false
        every_n_train_steps: {every}
        save_top_k: -1
        save_last: true
    - class_path: seg.train.callbacks.seed_each_epoch.SeedEachEpoch
"""


def fit_command(data: Path, overlay: Path, steps: int, resume: bool) -> list[str]:
    """``python cli.py fit`` with the paper config shrunk to CPU size."""
    import dataclasses
    import json

    from seg.data import DEMO

    spec = dataclasses.replace(DEMO, test_scale=(128, 64))  # the demo's classes, evaluated small
    command = [
        sys.executable, str(REPO / "cli.py"), "fit",
        "--config", str(EXPERIMENT), "--config", str(TRAINER), "--config", str(overlay),
        "--model.model.init_args.encoder=test_flatten_pvt", "--model.model.init_args.encoder_checkpoint=null",
        f"--data.root={data}", f"--data.spec={json.dumps(spec.to_dict())}", "--data.crop_size=64",
        f"--data.batch_size={BATCH}", "--data.num_workers=0", "--data.train_scale=[128, 64]",
        f"--trainer.max_steps={steps}",
        f"--model.scheduler.init_args.max_steps={10 * steps}",  # poly decay still far from 0 at the end
    ]
    return command + (["--ckpt_path", "last"] if resume else [])


def prepare(workdir: Path, name: str, every: int) -> tuple[Path, Path]:
    """A run folder with its overlay config; returns (folder, checkpoint folder)."""
    folder = workdir / name
    checkpoints = folder / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "overlay.yaml").write_text(OVERLAY.format(every=every, checkpoints=checkpoints))
    return folder, checkpoints


def run(command: list[str], folder: Path, log: str) -> float:
    """Run to completion (raises with the log tail on failure); returns the wall time in seconds."""
    start = time.perf_counter()
    with open(folder / log, "w") as out:
        done = subprocess.run(command, cwd=folder, stdout=out, stderr=subprocess.STDOUT, env=_env())
    if done.returncode != 0:
        tail = (folder / log).read_text()[-3000:]
        raise RuntimeError(f"{' '.join(command[:3])} failed with exit status {done.returncode}:\n{tail}")
    return time.perf_counter() - start


def run_and_kill(command: list[str], folder: Path, checkpoints: Path, timeout: float) -> tuple[list[str], int]:
    """Start a run, SIGKILL it once its first ``last.ckpt`` exists (what ``--ckpt_path last`` resumes from).

    Returns the checkpoint files present at the kill and the process's exit status (-9 when killed).
    """
    with open(folder / "killed.log", "w") as out:
        process = subprocess.Popen(command, cwd=folder, stdout=out, stderr=subprocess.STDOUT, env=_env())
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            if (checkpoints / "last.ckpt").exists():
                break
            time.sleep(0.02)
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        status = process.wait()
    return sorted(p.name for p in checkpoints.glob("*")), status


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def summary(path: Path) -> dict:
    """Step, epoch, learning rates and weights of a Lightning checkpoint."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    optimizer = checkpoint["optimizer_states"][0]
    scheduler = checkpoint["lr_schedulers"][0]
    return {
        "step": int(checkpoint["global_step"]),
        "epoch": int(checkpoint["epoch"]),
        "lr": [float(group["lr"]) for group in optimizer["param_groups"]],
        "scheduler_lr": [float(lr) for lr in scheduler["_last_lr"]],
        "scheduler_step": int(scheduler["last_epoch"]),
        "weights": checkpoint["state_dict"],
    }


def weight_difference(a: dict, b: dict) -> tuple[float, bool]:
    """Largest absolute difference over all tensors, and whether every tensor is bit-identical."""
    if a.keys() != b.keys():
        raise ValueError("the two checkpoints hold different parameter names")
    largest = max((a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0 for k in a)
    return largest, all(torch.equal(a[k], b[k]) for k in a)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps of each run")
    parser.add_argument("--every", type=int, default=4, help="checkpoint every this many steps")
    parser.add_argument("--num-train", type=int, default=8, help="training images (epoch = num_train / 2 steps)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the first checkpoint")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temp folder)")
    args = parser.parse_args(argv)
    if args.steps <= args.every:
        parser.error("--steps must exceed --every, or the run ends before it can be killed")

    from seg.data import make_demo_dataset

    with tempfile.TemporaryDirectory() as tmp:
        workdir = (args.workdir or Path(tmp)).resolve()
        data = make_demo_dataset(workdir / "data", num_train=args.num_train, num_val=2, min_size=64, max_size=96)
        steps_per_epoch = args.num_train // BATCH

        straight, straight_ckpt = prepare(workdir, "uninterrupted", args.every)
        seconds = run(fit_command(data, straight / "overlay.yaml", args.steps, False), straight, "fit.log")

        broken, broken_ckpt = prepare(workdir, "killed_then_resumed", args.every)
        command = fit_command(data, broken / "overlay.yaml", args.steps, False)
        at_kill, status = run_and_kill(command, broken, broken_ckpt, args.timeout)
        if status != -signal.SIGKILL:
            raise RuntimeError(f"the run ended (exit status {status}) before it could be killed; raise --steps")
        resume_from = summary(broken_ckpt / "last.ckpt")["step"]
        run(fit_command(data, broken / "overlay.yaml", args.steps, True), broken, "resumed.log")
        resumed_log = (broken / "resumed.log").read_text()
        if "Restoring states from the checkpoint" not in resumed_log:
            raise RuntimeError("the resumed run did not load a checkpoint: `--ckpt_path last` found none")

        a = summary(straight_ckpt / "last.ckpt")
        b = summary(broken_ckpt / "last.ckpt")
        largest, identical = weight_difference(a["weights"], b["weights"])
        boundary = resume_from % steps_per_epoch == 0

    print(f"steps {args.steps}, checkpoint every {args.every}, epoch = {steps_per_epoch} steps; "
          f"uninterrupted run {seconds:.1f} s")
    print(f"killed (exit status {status}) with checkpoints {', '.join(at_kill)}; resumed from step {resume_from} "
          f"({'epoch boundary' if boundary else 'mid-epoch'})\n")
    print("| run | step | epoch | lr (group 0) | scheduler step | max abs weight diff |")
    print("|---|---|---|---|---|---|")
    for name, s, diff in (("uninterrupted", a, "-"), ("killed + resumed", b, f"{largest:.3g}")):
        print(f"| {name} | {s['step']} | {s['epoch']} | {s['lr'][0]:.9g} | {s['scheduler_step']} | {diff} |")
    counters = all(a[k] == b[k] for k in ("step", "epoch", "lr", "scheduler_lr", "scheduler_step"))
    print(f"\nstep, epoch and learning rates equal: {counters}; weights bit-identical: {identical}")
    return 0 if counters and (identical or not boundary) else 1


if __name__ == "__main__":
    sys.exit(main())

"""python -m seg.model.convert on published-layout (mmseg 0.x) checkpoints the tests write themselves: one to one
mapping, the refusals, the numpy-scalar allowlist, and a converted model in every command (predict, ONNX, the
web demo, fine-tuning on another class count)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _specs import DEMO_SMALL, spec_arg

from seg.data import make_demo_dataset
from seg.model.convert import ENCODER_PREFIX, main
from seg.model.segmentor import Segmentor
from seg.serve.predictor import Predictor
from seg.train.cli import cli_main
from seg.train.pretrained import from_config

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "configs" / "agent_swin_tiny_upernet_ade20k_160k.yaml"
TINY = ["--config", str(RECIPE), "--model.model.init_args.encoder=test_agent_swin",
        "--model.model.init_args.decoder_channels=32"]
FPN_RECIPE = ROOT / "configs" / "agent_pvt_tiny_fpn_ade20k_40k.yaml"  # all-agent stages: exports with dynamic H x W
FPN_TINY = ["--config", str(FPN_RECIPE), "--model.model.init_args.encoder=test_agent_pvt",
            "--model.model.init_args.decoder_channels=32"]
NUM_CLASSES = 150


class _RunsCode:
    """A ``meta`` entry that would create a folder if unpickling ran it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.makedirs, (str(self.marker),))


def published_layout(model: Segmentor) -> dict[str, torch.Tensor]:
    """The segmentor's tensors under mmseg's names (``backbone.``, ``neck.``, ``decode_head.``,
    ``auxiliary_head.``), as a published file holds them."""
    out = {}
    for name, value in model.state_dict().items():
        if name.startswith(ENCODER_PREFIX):
            name = "backbone." + name[len(ENCODER_PREFIX):]
        elif name.startswith("decode_head.neck."):
            name = "neck." + name[len("decode_head.neck."):]
        elif name.startswith("aux_head."):
            name = "auxiliary_head." + name[len("aux_head."):]
        out[name] = value.detach().clone().contiguous()
    return out


def write_published(path: Path, state: dict[str, torch.Tensor], **meta: object) -> Path:
    """A checkpoint as mmseg 0.x writes one: ``meta`` with numpy scalars, ``state_dict``, ``optimizer``."""
    names = tuple(f"thing {i}" for i in range(NUM_CLASSES))
    palette = [[i, 255 - i, (7 * i) % 256] for i in range(NUM_CLASSES)]
    meta = {"mmseg_version": "0.11.0", "config": "norm_cfg = dict(type='SyncBN')", "CLASSES": names,
            "PALETTE": palette, "iter": 160000, "epoch": 1, "seed": np.int64(0),
            "hook_msgs": {"last_ckpt": "work_dirs/iter_160000.pth", "best_score": np.float64(0.4668)}, **meta}
    optimizer = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 6e-5, "params": [0]}]}
    torch.save({"meta": meta, "state_dict": state, "optimizer": optimizer}, path)
    return path


def _reference(args: list[str]) -> Segmentor:
    """The tiny model of a recipe with non-trivial weights everywhere (BatchNorm statistics too)."""
    torch.manual_seed(0)
    model = from_config([*args, "--model.model.init_args.encoder_checkpoint=null"]).model
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5 if name.endswith("running_var")
                             else torch.randn_like(tensor) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def reference() -> Segmentor:
    return _reference(TINY)


@pytest.fixture(scope="module")
def converted(reference: Segmentor, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("convert")
    state = published_layout(reference)
    state["backbone.layers.3.blocks.1.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.int64)
    checkpoint = write_published(folder / "upernet_agent_swin_t.pth", state)
    return main([str(checkpoint), *TINY, "--out", str(folder / "saved")])


@pytest.fixture(scope="module")
def converted_fpn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("convert_fpn")
    checkpoint = write_published(folder / "fpn_agent_pvt_t.pth", published_layout(_reference(FPN_TINY)))
    return main([str(checkpoint), *FPN_TINY, "--out", str(folder / "saved")])


def test_converted_model_computes_what_the_published_one_does(reference: Segmentor, converted: Path) -> None:
    model = Segmentor.from_pretrained(converted)
    x = torch.randn(1, 3, 70, 101)
    with torch.no_grad():
        torch.testing.assert_close(model(x)["out"], reference(x)["out"], rtol=0, atol=0)
    predictor = Predictor.from_pretrained(converted)
    assert predictor.class_names[:2] == ["thing 0", "thing 1"]  # meta's CLASSES
    assert predictor.palette[3].tolist() == [3, 252, 21]  # meta's PALETTE
    card = (converted / "README.md").read_text()
    assert "upernet_agent_swin_t.pth" in card and predictor.source["sha256"] in card
    assert "mIoU 46.68" in card and "published" in card  # the recipe's published score, labelled as such


def test_report_lists_rebuilt_buffers(reference: Segmentor, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    state = published_layout(reference)
    state["backbone.layers.3.blocks.1.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.int64)
    state["decode_head.extra.weight"] = torch.zeros(1)
    main([str(write_published(tmp_path / "a.pth", state)), *TINY, "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "unexpected (not loaded): decode_head.extra.weight" in out
    assert "rebuilt from the input size, not loaded: 1 buffers" in out


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "seg.model.convert", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_missing_tensor_is_refused_by_name(reference: Segmentor, tmp_path: Path) -> None:
    state = published_layout(reference)
    del state["decode_head.conv_seg.bias"]
    state["auxiliary_head.conv_seg.weight"] = torch.zeros(3, 16, 1, 1)
    checkpoint = write_published(tmp_path / "broken.pth", state)
    result = _run(str(checkpoint), *TINY, "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "missing: decode_head.conv_seg.bias" in result.stdout
    assert "mis-shaped: auxiliary_head.conv_seg.weight (file (3, 16, 1, 1)" in result.stdout
    assert "error:" in result.stderr and "1 missing, 1 mis-shaped" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_pickled_callable_in_meta_is_refused_without_running(reference: Segmentor, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    checkpoint = write_published(tmp_path / "evil.pth", published_layout(reference), env_info=_RunsCode(marker))
    result = _run(str(checkpoint), *TINY, "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and "refused" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_numpy_scalars_of_numpy_1_files_are_allowed(reference: Segmentor, tmp_path: Path) -> None:
    """Files written under numpy 1.x name the scalar reconstructor ``numpy.core.multiarray.scalar``."""
    import zipfile

    from seg.model.convert import read_published

    path = write_published(tmp_path / "new.pth", {"decode_head.conv_seg.bias": torch.zeros(2)})
    old = tmp_path / "old.pth"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(old, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
            dst.writestr(item, data)
    if not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        pytest.skip("torch < 2.5 cannot allow a global under another module's name")
    meta = read_published(old)["meta"]
    assert meta["hook_msgs"]["best_score"] == pytest.approx(0.4668)


def test_no_unsafe_loading_in_the_package() -> None:
    sources = "\n".join(p.read_text() for p in (ROOT / "seg").rglob("*.py"))
    assert "weights_only=False" not in sources


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("data") / "tiny", num_train=4, num_val=2, min_size=64,
                             max_size=96)


def _tiny_cli(root: Path) -> list[str]:
    return [*TINY, "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
            "--trainer.sync_batchnorm=false", "--trainer.precision=32-true", f"--data.root={root}",
            "--data.crop_size=64", "--data.batch_size=2", "--data.num_workers=0", "--data.train_scale=[128, 64]"]


def _fine_tune_cli(converted: Path, root: Path) -> object:
    args = [*_tiny_cli(root), spec_arg(DEMO_SMALL), f"--model.weights={converted}", "--trainer.max_steps=50",
            "--trainer.limit_val_batches=0", "--trainer.val_check_interval=null",
            "--trainer.check_val_every_n_epoch=1000"]
    return cli_main(args, run=False)


def test_weights_on_another_class_count_reset_only_the_classifiers(
        converted: Path, reference: Segmentor, tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """12 demo classes from a 150-class model: the classifiers start fresh, one line says so, the rest loads."""
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO"):
        cli = _fine_tune_cli(converted, tiny_root)
    assert any("re-initialised the classifiers aux_head.conv_seg, decode_head.conv_seg for 12 classes (the weights "
               "have 150)" in r.getMessage() for r in caplog.records)
    loaded, ref = cli.model.model.state_dict(), reference.state_dict()
    assert loaded["decode_head.conv_seg.weight"].shape[0] == 12
    for name, value in ref.items():
        if ".conv_seg." not in name:
            torch.testing.assert_close(loaded[name], value, rtol=0, atol=0)


@pytest.mark.slow
def test_fine_tune_50_steps_on_the_demo_data(converted: Path, tiny_root: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = _fine_tune_cli(converted, tiny_root)
    before = cli.model.model.state_dict()["decode_head.fpn_bottleneck.conv.weight"].clone()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 50
    assert not torch.equal(cli.model.model.state_dict()["decode_head.fpn_bottleneck.conv.weight"], before)


def test_predict_folder_from_converted_model(converted: Path, tiny_root: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    photos = tiny_root / "images" / "validation"
    cli_main(["predict", *_tiny_cli(tiny_root), "--config", str(ROOT / "configs" / "predict.yaml"),
              f"--model.weights={converted}", f"--data.predict_root={photos}"])
    written = sorted(p.name for p in (tmp_path / "predictions").rglob("*.png"))
    assert len(written) == len(list(photos.iterdir())) > 0


def test_onnx_export_and_web_demo_from_converted_model(converted_fpn: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("fastapi")
    import onnxruntime as ort
    from fastapi.testclient import TestClient
    from PIL import Image

    from seg.serve.app import create_app
    from seg.serve.export import main as export_main

    converted = converted_fpn
    path = export_main(["--pretrained", str(converted), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = Segmentor.from_pretrained(converted)
    for h, w in [(64, 96), (70, 101)]:  # dynamic H x W
        x = torch.randn(1, 3, h, w)
        (got,) = session.run(None, {"image": x.numpy()})
        np.testing.assert_allclose(got, model(x)["out"].detach().numpy(), atol=1e-4, rtol=0)
    client = TestClient(create_app(Predictor.from_pretrained(converted)), base_url="http://127.0.0.1")
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(image)
    response = client.post("/api/segment", files={"image": (image.name, image.read_bytes(), "image/png")})
    assert response.status_code == 200, response.text
    assert all(item["name"].startswith("thing ") for item in response.json()["legend"])


def test_imagenet_and_lightning_checkpoints_go_through_the_same_command(tmp_path: Path) -> None:
    """A published ImageNet checkpoint initialises the encoder (the heads as built); a Lightning checkpoint of
    this project is a saved model of the same weights."""
    import timm

    torch.manual_seed(1)
    classifier = timm.create_model("test_agent_pvt", agent_shapes=[12, 16, 28, 28])
    imagenet = tmp_path / "agent_pvt_t.pth"
    torch.save({"model": classifier.state_dict(), "epoch": 299}, imagenet)
    saved = main([str(imagenet), *FPN_TINY, "--out", str(tmp_path / "imagenet")])
    encoder = Segmentor.from_pretrained(saved).state_dict()
    for name, value in classifier.state_dict().items():
        if not name.startswith("head."):
            torch.testing.assert_close(encoder[ENCODER_PREFIX + name], value, rtol=0, atol=0)
    assert "imagenet checkpoint" in (saved / "README.md").read_text()

    model = _reference(FPN_TINY)
    lightning = tmp_path / "best.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "pytorch-lightning_version": "2.6.6"}, lightning)
    loaded = Segmentor.from_pretrained(main([str(lightning), *FPN_TINY, "--out", str(tmp_path / "run")]))
    x = torch.randn(1, 3, 64, 90)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["out"], model(x)["out"], rtol=0, atol=0)

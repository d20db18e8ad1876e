"""Saved models: Segmentor / Predictor save -> load round trips through the hub mixin, config.json and the model
card, folders of the previous layout, Hub ids from the local cache, errors naming the file, and the checkpoint
command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _specs import DEMO_SMALL, named_spec, spec_arg
from safetensors.torch import save_file

from seg.data import DEMO_CLASS_NAMES, make_demo_dataset, make_palette
from seg.model.hub import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE
from seg.model.inference import InferenceConfig
from seg.model.segmentor import Segmentor
from seg.serve.predictor import Predictor
from seg.train.cli import cli_main
from seg.train.pretrained import from_checkpoint, main
from seg.train.task import SegmentationTask

CONFIGS = Path(__file__).parents[1] / "configs"
NAMES = ["sky", "grass", "road", "tree"]
ARGUMENTS = {
    "encoder": "test_flatten_pvt_v2", "decoder": "semantic_fpn", "num_classes": 4, "decoder_channels": 16,
    "aux_head": True, "encoder_kwargs": {"attn_type": "LLSS"}, "pad_multiple": None, "channels_last": True,
}  # fmt: skip


def tiny_segmentor(**kwargs) -> Segmentor:
    torch.manual_seed(0)
    args = dict(encoder="test_flatten_pvt_v2", decoder="semantic_fpn", num_classes=4, decoder_channels=16)
    return Segmentor(**{**args, **kwargs}).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Predictor, Path]:
    model = tiny_segmentor(encoder_kwargs={"attn_type": "LLSS"})
    with torch.no_grad():  # non-default BatchNorm statistics, so buffers are checked too
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    folder = tmp_path_factory.mktemp("pretrained") / "tiny"
    predictor = Predictor(model, named_spec(NAMES, (128, 64), name="street scenes"),
                          inference=InferenceConfig("slide", 64, 48), metrics={"val/mIoU": 0.4321})
    assert predictor.save_pretrained(folder) == folder
    return predictor, folder


def test_round_trip_gives_equal_logits(saved: tuple[Predictor, Path]) -> None:
    model, folder = saved[0].model, saved[1]
    loaded = Segmentor.from_pretrained(folder)
    assert not loaded.training
    x = torch.randn(2, 3, 70, 101)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["out"], model(x)["out"], rtol=0, atol=0)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)
    assert loaded.arguments == ARGUMENTS


def test_config_json_and_model_card(saved: tuple[Predictor, Path]) -> None:
    _, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == [CARD_FILE, CONFIG_FILE, WEIGHTS_FILE]
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config == {
        **ARGUMENTS, "format": "flatten-seg", "version": 3, "metrics": {"val/mIoU": 0.4321},
        "dataset": {"name": "street scenes", "num_classes": 4, "ignore_index": 255, "reduce_zero_label": True,
                    "class_names": NAMES, "palette": make_palette(4).tolist(),
                    "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375], "test_scale": [128, 64]},
        "inference": {**config["inference"], "mode": "slide", "crop_size": 64, "stride": 48},
    }  # fmt: skip
    card = (folder / CARD_FILE).read_text()
    assert card.startswith("---\n") and "library_name: flatten-seg" in card and "- street scenes" in card
    for text in ("`test_flatten_pvt_v2` (attn_type='LLSS')", "`semantic_fpn`, 16 channels", "4: sky, grass, road, tree",
                 "| data set | street scenes |", "val/mIoU 0.4321", "Predictor.from_pretrained"):
        assert text in card

    predictor = Predictor.from_pretrained(folder)
    assert predictor.class_names == NAMES and predictor.test_scale == (128, 64)
    assert predictor.inference == InferenceConfig(mode="slide", crop_size=64, stride=48)
    assert predictor.dataset == "street scenes" and predictor.metrics == {"val/mIoU": 0.4321}
    np.testing.assert_array_equal(predictor.palette, make_palette(4))


def test_predict_equals_the_task_path(saved: tuple[Predictor, Path]) -> None:
    """Labels at the photo's size, equal to SegmentationTask's inference on the same preprocessed photo."""
    predictor = Predictor.from_pretrained(saved[1])
    image = np.random.default_rng(0).integers(0, 256, (45, 77, 3), dtype=np.uint8)
    labels = predictor.predict(image)
    assert labels.shape == (45, 77) and labels.min() >= 0 and labels.max() < 4
    task = SegmentationTask(predictor.model, inference=predictor.inference).eval()
    x = torch.from_numpy(predictor.transform()(image=image)["image"]).permute(2, 0, 1)[None]  # (1, 3, h, w)
    with torch.no_grad():
        expected = task(x, out_size=(45, 77)).argmax(dim=1)[0].numpy()
    np.testing.assert_array_equal(labels, expected)


def test_segmentor_alone_and_defaults(tmp_path: Path) -> None:
    """Segmentor.save_pretrained writes its arguments and a card; a Predictor fills in the defaults."""
    model = tiny_segmentor(aux_head=False, encoder_checkpoint=None)
    assert model.save_pretrained(tmp_path) is None  # the mixin's return: a URL only when pushing
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config == {**ARGUMENTS, "aux_head": False, "encoder_kwargs": {}, "format": "flatten-seg", "version": 3}
    card = (tmp_path / CARD_FILE).read_text()
    assert "| classes | 4 |" in card and "data set" not in card and "metrics" not in card
    predictor = Predictor.from_pretrained(tmp_path)
    assert predictor.class_names == ["class_0", "class_1", "class_2", "class_3"]
    assert predictor.test_scale == (2048, 512) and predictor.inference.mode == "whole"  # the data module's defaults


def test_version_1_folder_still_loads(saved: tuple[Predictor, Path], tmp_path: Path) -> None:
    """A folder written by seg.train.pretrained before the hub layout: arguments under "model", no model card."""
    predictor, _ = saved
    folder = tmp_path / "v1"
    folder.mkdir()
    state = {k: v.contiguous() for k, v in predictor.model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps({
        "format": "flatten-seg", "version": 1, "model": ARGUMENTS, "class_names": NAMES,
        "palette": make_palette(4).tolist(),
        "preprocessing": {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375], "test_scale": [128, 64]},
        "inference": {"mode": "slide", "crop_size": 64, "stride": 48, "scales": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75],
                      "flip": False, "multiscale_mode": "whole", "batch_windows": 1},
    }))  # fmt: skip; the file as seg.train.pretrained wrote it up to commit a8dc0d4
    loaded = Predictor.from_pretrained(folder)
    assert loaded.class_names == NAMES and loaded.test_scale == (128, 64) and loaded.inference.mode == "slide"
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x)["out"], predictor.model(x)["out"], rtol=0, atol=0)
    assert Segmentor.from_pretrained(folder).arguments == ARGUMENTS


def hub_cache(saved: Path, cache: Path, repo: str) -> Path:
    """The Hugging Face cache layout of a downloaded repository (refs/main -> snapshots/<commit>/files)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    (root / "snapshots" / commit).mkdir(parents=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE):
        (root / "snapshots" / commit / name).write_bytes((saved / name).read_bytes())
    return cache


def test_hub_id_from_the_local_cache(saved: tuple[Predictor, Path], tmp_path: Path) -> None:
    cache = hub_cache(saved[1], tmp_path / "hf", "acme/tiny-seg")
    loaded = Predictor.from_pretrained("acme/tiny-seg", cache_dir=cache, local_files_only=True)
    assert loaded.class_names == NAMES
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x)["out"], saved[0].model(x)["out"], rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="config.json of the Hub model acme/other is not in the local cache"):
        Segmentor.from_pretrained("acme/other", cache_dir=cache, local_files_only=True)


def test_push_to_hub_uploads_the_saved_files(saved: tuple[Predictor, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """push_to_hub (the mixin's) uploads what save_pretrained writes; the Hub client is replaced, nothing is sent."""
    uploaded: dict[str, bytes] = {}

    class FakeApi:
        def __init__(self, token=None) -> None:
            pass

        def create_repo(self, repo_id: str, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id: str, folder_path, **kwargs) -> str:
            uploaded.update({p.name: p.read_bytes() for p in Path(folder_path).iterdir()})
            return f"https://hub.invalid/{repo_id}/commit/1"

    monkeypatch.setattr("huggingface_hub.hub_mixin.HfApi", FakeApi)
    predictor, folder = saved
    assert predictor.push_to_hub("acme/tiny-seg") == "https://hub.invalid/acme/tiny-seg/commit/1"
    assert uploaded == {name: (folder / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE)}


def test_missing_folder_and_files_are_named(saved: tuple[Predictor, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pretrained folder .*nowhere does not exist"):
        Segmentor.from_pretrained(tmp_path / "nowhere")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        folder = tmp_path / f"without_{name}"
        folder.mkdir()
        other = WEIGHTS_FILE if name == CONFIG_FILE else CONFIG_FILE
        (folder / other).write_bytes((saved[1] / other).read_bytes())
        with pytest.raises(FileNotFoundError, match=f"{folder / name} is missing"):
            Predictor.from_pretrained(folder)


def copy_with_config(saved: Path, folder: Path, edit) -> Path:
    folder.mkdir()
    (folder / WEIGHTS_FILE).write_bytes((saved / WEIGHTS_FILE).read_bytes())
    config = json.loads((saved / CONFIG_FILE).read_text())
    edit(config)
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    return folder


def test_config_that_does_not_match_the_weights(saved: tuple[Predictor, Path], tmp_path: Path) -> None:
    folder = copy_with_config(saved[1], tmp_path / "wider", lambda c: c.update(decoder_channels=32))
    with pytest.raises(ValueError, match=rf"{folder / WEIGHTS_FILE} does not match .*{CONFIG_FILE}.*mis-shaped"):
        Segmentor.from_pretrained(folder)
    folder = copy_with_config(saved[1], tmp_path / "no_aux", lambda c: c.update(aux_head=False))
    with pytest.raises(ValueError, match=r"does not match .*unexpected \d+: aux_head\."):
        Segmentor.from_pretrained(folder)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["dataset"]["class_names"].pop(), "field 'dataset.class_names' must hold 4 values, got 3"),
        (lambda c: c["dataset"]["palette"].pop(), "field 'dataset.palette' must hold 4 values, got 3"),
        (lambda c: c.update(encoder="no_such_encoder"), "field 'encoder' 'no_such_encoder' is not a registered"),
        (lambda c: c["inference"].update(mode="sideways"), "bad 'inference' entry"),
        (lambda c: c.update(version=4), "has version 4; this code reads versions 1 to 3"),
        (lambda c: c.pop("encoder"), "need a string 'encoder'"),
    ],
    ids=["class_names", "palette", "encoder", "inference", "version", "no_encoder"],
)
def test_bad_config_is_named(saved: tuple[Predictor, Path], tmp_path: Path, edit, message: str) -> None:
    folder = copy_with_config(saved[1], tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=rf"{folder / CONFIG_FILE}.*{message}"):
        Predictor.from_pretrained(folder)


def test_unreadable_files_are_named(saved: tuple[Predictor, Path], tmp_path: Path) -> None:
    folder = copy_with_config(saved[1], tmp_path / "broken", lambda c: None)
    (folder / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=f"{folder / WEIGHTS_FILE} is not a readable safetensors file"):
        Segmentor.from_pretrained(folder)
    (folder / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=f"{folder / CONFIG_FILE} is not valid JSON"):
        Segmentor.from_pretrained(folder)


def demo_args(root: Path, encoder: str = "test_flatten_pvt_v2") -> list[str]:
    """The demo config on a tiny model and data set."""
    return [
        "--config", str(CONFIGS / "demo.yaml"), f"--model.model.init_args.encoder={encoder}",
        f"--data.root={root}", "--data.demo=false", "--data.crop_size=64", "--data.batch_size=2",
        "--data.num_workers=0", "--data.train_scale=[128, 64]", spec_arg(DEMO_SMALL),
    ]  # fmt: skip


def test_cli_writes_a_folder_from_a_lightning_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    root = make_demo_dataset(tmp_path / "data", num_train=2, num_val=1, min_size=64, max_size=72)
    args = demo_args(root)
    cli = cli_main(args, run=False)  # a Lightning checkpoint of the run as training writes one, without training
    with torch.no_grad():  # weights the seeded initialisation would not give, so loading them is tested
        for param in cli.model.model.parameters():
            param.add_(torch.randn_like(param))
    cli.trainer.strategy.connect(cli.model)
    ckpt = tmp_path / "last.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    folder = main([*args, "--ckpt_path", str(ckpt), "--out", str(tmp_path / "pretrained" / "demo")])

    predictor = Predictor.from_pretrained(folder)
    assert predictor.class_names == list(DEMO_CLASS_NAMES)  # from the data set spec
    np.testing.assert_array_equal(predictor.palette, DEMO_SMALL.palette_array)
    assert predictor.test_scale == (128, 64) and predictor.model.config["decoder"] == "fpn"
    card = (folder / CARD_FILE).read_text()
    assert predictor.dataset == DEMO_SMALL.name and f"| data set | {DEMO_SMALL.name} |" in card
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for name, tensor in predictor.model.state_dict().items():
        torch.testing.assert_close(tensor, state[f"model.{name}"], rtol=0, atol=0)
    built = from_checkpoint(args, ckpt).model
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(predictor.model(x)["out"], built(x)["out"], rtol=0, atol=0)

    with pytest.raises(ValueError, match=rf"{ckpt} does not match the model built from .*demo.yaml"):
        from_checkpoint(demo_args(root, encoder="test_flatten_pvt"), ckpt)
    with pytest.raises(FileNotFoundError, match="checkpoint missing.ckpt does not exist"):
        main([*args, "--ckpt_path", "missing.ckpt", "--out", "x"])

"""Pretrained folders: save -> load round trips, config.json content, errors naming the file, the checkpoint CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _specs import DEMO_SMALL, spec_arg

from seg.cli import cli_main
from seg.data import DEMO_CLASS_NAMES, make_demo_dataset, make_palette
from seg.inference import InferenceConfig
from seg.models import Segmentor
from seg.pretrained import CONFIG_FILE, WEIGHTS_FILE, from_checkpoint, load_pretrained, main

CONFIGS = Path(__file__).parents[1] / "configs"
NAMES = ["sky", "grass", "road", "tree"]


def tiny_segmentor(**kwargs) -> Segmentor:
    torch.manual_seed(0)
    args = dict(encoder="test_flatten_pvt_v2", decoder="semantic_fpn", num_classes=4, decoder_channels=16)
    return Segmentor(**{**args, **kwargs}).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Segmentor, Path]:
    model = tiny_segmentor(encoder_kwargs={"attn_type": "LLSS"})
    with torch.no_grad():  # non-default BatchNorm statistics, so buffers are checked too
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    folder = tmp_path_factory.mktemp("pretrained") / "tiny"
    inference = InferenceConfig(mode="slide", crop_size=64, stride=48)
    returned = model.save_pretrained(folder, class_names=NAMES, test_scale=(128, 64), inference=inference)
    assert returned == folder
    return model, folder


def test_round_trip_gives_equal_logits(saved: tuple[Segmentor, Path]) -> None:
    model, folder = saved
    loaded = Segmentor.from_pretrained(folder)
    assert not loaded.training
    x = torch.randn(2, 3, 70, 101)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["out"], model(x)["out"], rtol=0, atol=0)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)
    assert loaded.config == {**model.config, "encoder_kwargs": {"attn_type": "LLSS"}}


def test_config_json_content(saved: tuple[Segmentor, Path]) -> None:
    _, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["format"] == "flatten-seg" and config["version"] == 1
    assert config["model"] == {
        "encoder": "test_flatten_pvt_v2", "decoder": "semantic_fpn", "num_classes": 4, "decoder_channels": 16,
        "aux_head": True, "encoder_kwargs": {"attn_type": "LLSS"}, "pad_multiple": None, "channels_last": True,
    }  # fmt: skip
    assert config["class_names"] == NAMES
    assert config["palette"] == make_palette(4).tolist()
    assert config["preprocessing"] == {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375],
                                       "test_scale": [128, 64]}
    assert config["inference"]["mode"] == "slide" and config["inference"]["crop_size"] == 64

    bundle = load_pretrained(folder)
    assert bundle.class_names == NAMES and bundle.test_scale == (128, 64)
    assert bundle.inference == InferenceConfig(mode="slide", crop_size=64, stride=48)
    np.testing.assert_array_equal(bundle.palette, make_palette(4))


def test_predict_gives_labels_at_image_size(saved: tuple[Segmentor, Path]) -> None:
    bundle = load_pretrained(saved[1])
    image = np.random.default_rng(0).integers(0, 256, (45, 77, 3), dtype=np.uint8)
    labels = bundle.predict(image)
    assert labels.shape == (45, 77) and labels.min() >= 0 and labels.max() < 4


def test_defaults_without_metadata(tmp_path: Path) -> None:
    tiny_segmentor(aux_head=False).save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["class_names"] == ["class_0", "class_1", "class_2", "class_3"]
    assert config["preprocessing"]["test_scale"] == [2048, 512]  # ADE20K's
    assert config["inference"]["mode"] == "whole"


def test_missing_folder_and_files_are_named(saved: tuple[Segmentor, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pretrained folder .*nowhere does not exist"):
        Segmentor.from_pretrained(tmp_path / "nowhere")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        folder = tmp_path / f"without_{name}"
        folder.mkdir()
        other = WEIGHTS_FILE if name == CONFIG_FILE else CONFIG_FILE
        (folder / other).write_bytes((saved[1] / other).read_bytes())
        with pytest.raises(FileNotFoundError, match=f"{folder / name} is missing"):
            Segmentor.from_pretrained(folder)


def copy_with_config(saved: Path, folder: Path, edit) -> Path:
    folder.mkdir()
    (folder / WEIGHTS_FILE).write_bytes((saved / WEIGHTS_FILE).read_bytes())
    config = json.loads((saved / CONFIG_FILE).read_text())
    edit(config)
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    return folder


def test_config_that_does_not_match_the_weights(saved: tuple[Segmentor, Path], tmp_path: Path) -> None:
    def wider(config: dict) -> None:
        config["model"]["decoder_channels"] = 32

    folder = copy_with_config(saved[1], tmp_path / "wider", wider)
    with pytest.raises(ValueError, match=rf"{folder / WEIGHTS_FILE} does not match .*{CONFIG_FILE}.*mis-shaped"):
        Segmentor.from_pretrained(folder)

    def no_aux(config: dict) -> None:
        config["model"]["aux_head"] = False

    folder = copy_with_config(saved[1], tmp_path / "no_aux", no_aux)
    with pytest.raises(ValueError, match=r"does not match .*unexpected \d+: aux_head\."):
        Segmentor.from_pretrained(folder)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["class_names"].pop(), "3 class names for a model of 4 classes"),
        (lambda c: c["palette"].pop(), "palette must be 4 RGB triples"),
        (lambda c: c["model"].update(encoder="no_such_encoder"), "cannot build the segmentor"),
        (lambda c: c["inference"].update(mode="sideways"), "bad 'inference' entry"),
        (lambda c: c.pop("preprocessing"), "no 'preprocessing' entry"),
    ],
    ids=["class_names", "palette", "encoder", "inference", "preprocessing"],
)
def test_bad_config_is_named(saved: tuple[Segmentor, Path], tmp_path: Path, edit, message: str) -> None:
    folder = copy_with_config(saved[1], tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=rf"{folder / CONFIG_FILE}.*{message}"):
        Segmentor.from_pretrained(folder)


def test_unreadable_files_are_named(saved: tuple[Segmentor, Path], tmp_path: Path) -> None:
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

    bundle = load_pretrained(folder)
    assert bundle.class_names == list(DEMO_CLASS_NAMES)  # from the data set spec
    np.testing.assert_array_equal(bundle.palette, DEMO_SMALL.palette_array)
    assert bundle.test_scale == (128, 64) and bundle.model.config["decoder"] == "fpn"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for name, tensor in bundle.model.state_dict().items():
        torch.testing.assert_close(tensor, state[f"model.{name}"], rtol=0, atol=0)
    built = from_checkpoint(args, ckpt).model
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(bundle.model(x)["out"], built(x)["out"], rtol=0, atol=0)

    with pytest.raises(ValueError, match=rf"{ckpt} does not match the model built from .*demo.yaml"):
        from_checkpoint(demo_args(root, encoder="test_flatten_pvt"), ckpt)
    with pytest.raises(FileNotFoundError, match="checkpoint missing.ckpt does not exist"):
        main([*args, "--ckpt_path", "missing.ckpt", "--out", "x"])

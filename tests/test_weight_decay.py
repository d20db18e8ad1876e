"""Weight-decay groups per recipe, the same on one device and under FSDP (wrapped as Lightning wraps the task)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from jsonargparse.typing import import_object

from seg.model.backbones.pvt import Block
from seg.model.backbones.soft import SoftBlock
from seg.model.backbones.swin import SwinBlock
from seg.model.segmentor import Segmentor
from seg.train.task import SegmentationTask
from seg.train.weight_decay import clean_param_name

FSDP_CONFIG = Path(__file__).parents[1] / "configs" / "trainer" / "fsdp.yaml"
BLOCKS = {Block, SwinBlock, SoftBlock}


def _task(encoder: str, decoder: str, rule: str) -> SegmentationTask:
    torch.manual_seed(0)
    model = Segmentor(encoder, decoder, num_classes=3, decoder_channels=32, aux_head=decoder == "upernet")
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.01)
    return SegmentationTask(model, optimizer=optimizer, no_decay=rule)  # type: ignore[arg-type]


def _decayed(task: SegmentationTask) -> tuple[set[str], set[str]]:
    """Original names of the parameters in the decayed group and in the others, from the optimizer's groups."""
    names = {id(p): clean_param_name(n) for n, p in task.named_parameters()}
    groups = task.param_groups()
    decayed = {names[id(p)] for p in groups[0]["params"]}
    others = {names[id(p)] for g in groups[1:] for p in g["params"]}
    assert all(g["weight_decay"] == 0.0 for g in groups[1:])
    return decayed, others


@pytest.fixture(scope="module")
def process_group(tmp_path_factory: pytest.TempPathFactory):
    """A one-process gloo group: FSDP wraps and names parameters on CPU as it does on GPUs."""
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group of its own")
    store = tmp_path_factory.mktemp("dist") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _fsdp_wrap(task: SegmentationTask, use_orig_params: bool) -> None:
    """Wrap the task as Lightning's FSDPStrategy does (configure_model first, then FSDP around the module)."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    task.configure_model()
    with pytest.warns(UserWarning, match="NO_SHARD"):  # one process: FSDP keeps whole copies
        FullyShardedDataParallel(task, auto_wrap_policy=ModuleWrapPolicy(BLOCKS), use_orig_params=use_orig_params,
                                 device_id=torch.device("cpu"))


# (encoder, decoder, recipe rule, names that must decay, names that must not)
RECIPES = [
    ("test_flatten_pvt", "semantic_fpn", "decay_all",
     {"model.encoder.model.model.block1.0.attn.scale", "model.encoder.model.model.block1.0.norm1.weight",
      "model.encoder.model.model.pos_embed1", "model.decode_head.conv_seg.bias"}, set()),
    ("test_flatten_swin", "upernet", "norms_tables",
     {"model.encoder.model.model.layers.0.blocks.0.attn.qkv.bias", "model.decode_head.conv_seg.weight",
      "model.decode_head.conv_seg.bias"},
     {"model.encoder.model.model.layers.0.blocks.0.attn.scale",
      "model.encoder.model.model.layers.0.blocks.0.attn.positional_encoding",
      "model.encoder.model.model.layers.2.blocks.0.attn.relative_position_bias_table",
      "model.encoder.model.model.layers.0.blocks.0.norm1.weight",
      "model.encoder.model.model.layers.0.blocks.0.norm1.bias"}),
]


@pytest.mark.parametrize(("encoder", "decoder", "rule", "decays", "exempt"), RECIPES, ids=lambda v: str(v)[:20])
def test_recipe_groups_on_one_device(encoder: str, decoder: str, rule: str, decays: set[str],
                                     exempt: set[str]) -> None:
    task = _task(encoder, decoder, rule)
    all_names = {n for n, _ in task.named_parameters()}
    assert decays | exempt <= all_names, sorted((decays | exempt) - all_names)
    decayed, others = _decayed(task)
    assert decayed | others == all_names and not decayed & others
    assert decays <= decayed and exempt <= others
    if rule == "decay_all":
        assert len(task.param_groups()) == 1


@pytest.mark.parametrize(("encoder", "decoder", "rule", "decays", "exempt"), RECIPES, ids=lambda v: str(v)[:20])
def test_recipe_groups_under_fsdp_match_one_device(process_group: None, encoder: str, decoder: str, rule: str,
                                                   decays: set[str], exempt: set[str]) -> None:
    reference = _decayed(_task(encoder, decoder, rule))
    task = _task(encoder, decoder, rule)
    _fsdp_wrap(task, use_orig_params=True)
    wrapped = [n for n, _ in task.named_parameters() if "_fsdp_wrapped_module" in n]
    assert wrapped  # blocks are FSDP units: their names changed
    assert _decayed(task) == reference


def test_flattened_fsdp_parameters(process_group: None) -> None:
    """use_orig_params=False: one group for decay_all; a clear error for any rule that exempts parameters."""
    task = _task("test_flatten_pvt", "semantic_fpn", "decay_all")
    _fsdp_wrap(task, use_orig_params=False)
    (group,) = task.param_groups()
    names = [n for n, _ in task.named_parameters()]
    assert names and all(n.endswith("_flat_param") for n in names)
    assert len(group["params"]) == len(list(task.parameters()))
    task = _task("test_flatten_swin", "upernet", "norms_tables")
    _fsdp_wrap(task, use_orig_params=False)
    with pytest.raises(ValueError, match="use_orig_params"):
        task.param_groups()


def test_fsdp_config_wraps_every_block_and_keeps_original_parameters() -> None:
    strategy = yaml.safe_load(FSDP_CONFIG.read_text())["trainer"]["strategy"]
    assert {import_object(path) for path in strategy["init_args"]["auto_wrap_policy"]} == BLOCKS
    assert strategy["dict_kwargs"]["use_orig_params"] is True

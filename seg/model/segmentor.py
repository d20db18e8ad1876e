"""Segmentor: a timm encoder + a decode head (+ the recipe's auxiliary FCN head), at any image size.

The encoder is smp's timm universal encoder (``tu-<name>``): any timm model with 4 feature stages works,
ours (``flatten_pvt_tiny``, ...; registered on ``import seg``) or timm's (``pvt_v2_b0``, ...). It returns
smp's feature list ``[x, empty, s4, s8, s16, s32]`` (strides 1, 2, 4, 8, 16, 32; the stride-2 map has
0 channels for transformer encoders) and reports the matching ``out_channels``. Every head reads its widths
from there.

Decoders (``DECODERS``): ``upernet`` and ``semantic_fpn``, the recipes' heads as mmsegmentation 0.x computes
them, parameter for parameter (:mod:`seg.model.heads`: published ADE20K segmenters load one to one), ``segformer``
(SegFormer's all-MLP head, :class:`seg.model.heads.SegFormerHead`: smp's ``SegformerDecoder`` logits and parameter
names, computed level by level), and smp's ``smp_upernet`` (the ``upernet`` of saved models before version 3) and
``fpn`` decoders at their default widths. smp's DeepLabV3+ needs an encoder that can run at output stride 16
(dilation), which the transformer encoders here cannot, so it is not offered.

UperNet's pyramid pooling has BatchNorm on 1x1 pooled maps: in training each device must hold more than one
image (``forward`` raises otherwise).

Padding: the encoder sees the image at its own size, never zero-padded to the output stride, because every
padded token would enter the global key / value summaries of focused linear attention (and SOFT's landmarks)
and change the logits of real pixels. The encoders and the ``upernet``, ``semantic_fpn`` and ``segformer``
heads take any size; smp's ``fpn`` upsamples by exact factors of 2, so for it alone the input is padded to /32.
A batch of images padded to a common size is segmented image by image at each image's own size (``sizes``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard, PyTorchModelHubMixin
from segmentation_models_pytorch.base.initialization import initialize_decoder
from segmentation_models_pytorch.decoders.fpn.decoder import FPNDecoder
from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
from segmentation_models_pytorch.encoders import get_encoder
from torch import Tensor, nn

from seg.data.spec import ADE20K
from seg.model import hub
from seg.model.heads import AuxFCNHead, SegFormerHead, SemanticFPNHead, UPerHead
from seg.model.legacy import upgrade_arguments, upgrade_state

__all__ = ["DECODERS", "DecoderName", "Segmentor", "SmpDecodeHead"]

DecoderName = Literal["upernet", "semantic_fpn", "smp_upernet", "fpn", "segformer"]

# smp feature lists hold the input and a stride-2 map before the 4 encoder stages: depth 5 = strides 1..32.
_SMP_DEPTH = 5

class SmpDecodeHead(nn.Module):
    """An smp decoder followed by channel dropout and a 1x1 classifier (smp's own head upsamples with
    ``align_corners=True``; the segmentor resizes the logits itself instead).

    Args:
        decoder: smp decoder taking smp's feature list and returning (B, channels, H/4, W/4).
        channels: width of the decoder output.
        num_classes: number of output classes.
        dropout: channel dropout probability before the classifier.
    """

    def __init__(self, decoder: nn.Module, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.decoder = decoder
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)
        initialize_decoder(self.decoder)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: list[Tensor]) -> Tensor:
        """Map smp's feature list to logits (B, num_classes, H/4, W/4)."""
        # smp decoders may overwrite list entries in place; give them their own list.
        return self.classifier(self.dropout(self.decoder(list(features))))


def _upernet(encoder_channels: Sequence[int], num_classes: int, channels: int | None) -> nn.Module:
    """mmseg's UPerHead (PPM 1/2/3/6 + FPN), 512 channels by default: the Swin-family recipes' head."""
    return UPerHead(encoder_channels[-4:], num_classes, channels or 512)


def _semantic_fpn(encoder_channels: Sequence[int], num_classes: int, channels: int | None) -> nn.Module:
    """mmseg's FPN neck + FPNHead: 256-channel pyramid, 128-channel scale heads by default (the PVT recipes)."""
    fpn_channels = channels or 256
    return SemanticFPNHead(encoder_channels[-4:], num_classes, fpn_channels, head_channels=fpn_channels // 2)


def _smp_upernet(encoder_channels: Sequence[int], num_classes: int, channels: int | None) -> nn.Module:
    """smp's UPerNet decoder (a LayerNorm per level), 512 channels and dropout 0.1 by default: the project's
    ``upernet`` before saved-model version 3."""
    channels = channels or 512
    decoder = UPerNetDecoder(encoder_channels, encoder_depth=_SMP_DEPTH, decoder_channels=channels)
    return SmpDecodeHead(decoder, channels, num_classes, dropout=0.1)


def _fpn(encoder_channels: Sequence[int], num_classes: int, channels: int | None) -> nn.Module:
    """smp's FPN (GroupNorm, dropout 0.2 inside); ``channels`` sets its pyramid width (smp default 256)."""
    decoder = FPNDecoder(encoder_channels, encoder_depth=_SMP_DEPTH, pyramid_channels=channels or 256)
    return SmpDecodeHead(decoder, decoder.out_channels, num_classes, dropout=0.0)


def _segformer(encoder_channels: Sequence[int], num_classes: int, channels: int | None) -> nn.Module:
    """SegFormer's all-MLP head, computed level by level (the logits of smp's ``SegformerDecoder`` + 1x1
    classifier, its parameter names); ``channels`` sets its width (default 256)."""
    return SegFormerHead(encoder_channels[-4:], num_classes, channels or 256)


@dataclass(frozen=True)
class _DecoderSpec:
    """How to build a decode head, and whether it has BatchNorm over 1x1 pooled maps (needs batch > 1)."""

    build: Callable[[Sequence[int], int, int | None], nn.Module]
    pooled_batchnorm: bool = False
    pad_multiple: int = 1  # input size multiple the head needs (1: any size)


DECODERS: dict[str, _DecoderSpec] = {
    "upernet": _DecoderSpec(_upernet, pooled_batchnorm=True),
    "semantic_fpn": _DecoderSpec(_semantic_fpn),
    "smp_upernet": _DecoderSpec(_smp_upernet, pooled_batchnorm=True),
    "fpn": _DecoderSpec(_fpn, pad_multiple=32),  # smp's FPN upsamples by exact factors of 2
    "segformer": _DecoderSpec(_segformer),
}
assert set(DECODERS) == set(get_args(DecoderName)), "DECODERS and DecoderName must list the same names"


class Segmentor(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="flatten-seg",
    tags=list(hub.CARD_TAGS),
):
    """Encoder + decode head (+ auxiliary FCN head on the stride-16 map in training).

    Saves and loads itself with huggingface_hub's ``PyTorchModelHubMixin``: :meth:`save_pretrained` writes
    ``config.json`` (:attr:`arguments`), ``model.safetensors`` and a model card (``README.md``) into a folder,
    ``push_to_hub`` uploads them, :meth:`from_pretrained` reads a folder or a Hub id (see :mod:`seg.model.hub`).

    Args:
        encoder: timm model name (``flatten_pvt_tiny``, ``pvt_v2_b0``, ...), built features-only.
        decoder: decode head, one of ``DECODERS``.
        num_classes: number of output classes.
        decoder_channels: decoder width; None uses the recipe's (upernet 512; semantic_fpn 256 pyramid /
            128 scale heads) or smp's default (fpn, segformer: 256).
        aux_head: add the recipe's auxiliary FCN head (256 channels) on the stride-16 encoder map; its logits
            are returned in training only.
        encoder_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. ``attn_type``,
            ``drop_path_rate``).
        encoder_checkpoint: path of an ImageNet checkpoint to load into the encoder, the timm way
            (``pretrained=True, pretrained_cfg_overlay=dict(file=path)``; the model's filter function
            converts it).
        pad_multiple: zero-pad inputs on the bottom / right to a multiple of this (pixels) and crop the logits
            back; None pads only where the decoder needs it (smp's ``fpn``: 32), since padded pixels change
            the logits of real ones through the global attention summaries.
        channels_last: hold the heads' conv weights channels-last, the layout the transformer encoders'
            feature maps already have, so the convolutions run without layout conversions (the Semantic FPN
            head at 2048 x 2048 takes 0.7x the time on CPU; see BENCHMARKS.md).
    """

    def __init__(
        self,
        encoder: str,
        decoder: DecoderName = "upernet",
        num_classes: int = ADE20K.num_classes,
        decoder_channels: int | None = None,
        aux_head: bool = True,
        encoder_kwargs: dict[str, Any] | None = None,
        encoder_checkpoint: str | None = None,
        pad_multiple: int | None = None,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r}; valid options: {', '.join(DECODERS)}")
        if pad_multiple is not None and pad_multiple < 1:
            raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
        kwargs = dict(encoder_kwargs or {})
        if encoder_checkpoint is not None:
            path = Path(encoder_checkpoint).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"encoder checkpoint not found: {path}")
            kwargs["pretrained_cfg_overlay"] = {**kwargs.get("pretrained_cfg_overlay", {}), "file": str(path)}

        self.encoder_name = encoder
        self.decoder_name = decoder
        self.num_classes = num_classes
        self.pad_multiple = DECODERS[decoder].pad_multiple if pad_multiple is None else pad_multiple
        # smp maps weights=None -> pretrained=False and anything else -> pretrained=True for tu- encoders.
        weights = True if encoder_checkpoint is not None else None
        self.encoder = get_encoder("tu-" + encoder, depth=_SMP_DEPTH, weights=weights, **kwargs)
        channels = list(self.encoder.out_channels)  # [3, 0 or C_s2, C1, C2, C3, C4] for strides 1..32
        spec = DECODERS[decoder]
        self._pooled_batchnorm = spec.pooled_batchnorm
        self.decode_head = spec.build(channels, num_classes, decoder_channels)
        self.aux_head = AuxFCNHead(channels[-2], num_classes) if aux_head else None
        if channels_last:
            self.decode_head.to(memory_format=torch.channels_last)
            if self.aux_head is not None:
                self.aux_head.to(memory_format=torch.channels_last)
        self.config = dict(  # the architecture (weights come from the saved file)
            encoder=encoder, decoder=decoder, num_classes=num_classes, decoder_channels=decoder_channels,
            aux_head=aux_head, encoder_kwargs=dict(encoder_kwargs or {}), pad_multiple=pad_multiple,
            channels_last=channels_last,
        )
        self._hub_mixin_config = {**self.arguments, "format": hub.FORMAT, "version": hub.VERSION}  # config.json

    @property
    def encoder_channels(self) -> list[int]:
        """Channels of the 4 encoder stages at strides 4, 8, 16, 32."""
        return list(self.encoder.out_channels[-4:])

    def forward(
        self, x: Tensor, sizes: Sequence[tuple[int, int]] | None = None, full_size: bool = True
    ) -> dict[str, Tensor]:
        """Segment a batch.

        Args:
            x: normalized images (B, 3, H, W), any H and W.
            sizes: each image's own (h, w) when the batch was padded to a common size on the bottom / right:
                each image is then segmented at its own size, so the padding never reaches the model, and its
                logits are placed top-left (zeros elsewhere). None: every image fills the whole H x W.
            full_size: resize the logits to H x W. False returns the heads' logits at their own stride (4 for
                every head here), for a caller that resizes them itself to another size (the predictor's
                striped argmax, :func:`seg.serve.limits.labels_at`); it needs an input the model does not pad and
                no ``sizes``.

        Returns:
            ``{'out': logits (B, num_classes, H, W)}`` (H / 4 x W / 4 with ``full_size=False``), plus ``'aux'``
            (same shape) in training when the auxiliary head exists.
        """
        B, _, H, W = x.shape
        if self.training and self._pooled_batchnorm and B < 2:
            raise ValueError(
                f"decoder {self.decoder_name!r} has BatchNorm on 1x1 pooled maps: training needs more than "
                f"one image per device, got batch size {B}"
            )
        if not full_size:
            return self._forward_head_stride(x, sizes)
        if sizes is not None and any(tuple(s) != (H, W) for s in sizes):
            return self._forward_sizes(x, sizes)
        pad_h, pad_w = -H % self.pad_multiple, -W % self.pad_multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))  # (B, 3, H + pad_h, W + pad_w), zeros bottom/right
        padded = (H + pad_h, W + pad_w)
        features = self.encoder(x)  # [x, s2, s4, s8, s16, s32]
        outputs = {"out": _resize_crop(self.decode_head(features), padded, (H, W))}
        if self.training and self.aux_head is not None:
            outputs["aux"] = _resize_crop(self.aux_head(features[-2]), padded, (H, W))
        return outputs

    def _forward_head_stride(self, x: Tensor, sizes: Sequence[tuple[int, int]] | None) -> dict[str, Tensor]:
        """:meth:`forward` with ``full_size=False``: the heads' logits, not resized."""
        H, W = x.shape[2:]
        if sizes is not None and any(tuple(s) != (H, W) for s in sizes):
            raise ValueError("full_size=False takes a batch of one image size (no `sizes`)")
        if H % self.pad_multiple or W % self.pad_multiple:
            raise ValueError(f"full_size=False needs H and W divisible by {self.pad_multiple} (the {self.decoder_name} "
                             f"decoder pads inputs to it), got {H} x {W}")
        features = self.encoder(x)  # [x, s2, s4, s8, s16, s32]
        outputs = {"out": self.decode_head(features)}
        if self.training and self.aux_head is not None:
            outputs["aux"] = self.aux_head(features[-2])
        return outputs

    def _forward_sizes(self, x: Tensor, sizes: Sequence[tuple[int, int]]) -> dict[str, Tensor]:
        """:meth:`forward` of each group of equally sized images, cropped to that size, placed top-left."""
        if len(sizes) != x.shape[0]:
            raise ValueError(f"got {len(sizes)} sizes for a batch of {x.shape[0]} images")
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (h, w) in enumerate(sizes):
            if not (0 < h <= x.shape[2] and 0 < w <= x.shape[3]):
                raise ValueError(f"image size {(h, w)} does not fit the batch's {tuple(x.shape[2:])}")
            groups.setdefault((int(h), int(w)), []).append(i)
        outputs: dict[str, Tensor] = {}
        for (h, w), index in groups.items():
            for key, logits in self(x[index, :, :h, :w]).items():
                if key not in outputs:
                    outputs[key] = logits.new_zeros(x.shape[0], logits.shape[1], *x.shape[2:])
                outputs[key][index, :, :h, :w] = logits
        return outputs

    @property
    def arguments(self) -> dict[str, Any]:
        """The architecture: the constructor's arguments as JSON values, as ``config.json`` holds them, without
        the ImageNet ``encoder_checkpoint`` (saved or checkpointed weights replace it)."""
        kwargs = {k: v for k, v in self.config["encoder_kwargs"].items() if k != "pretrained_cfg_overlay"}
        try:
            kwargs = json.loads(json.dumps(kwargs))
        except (TypeError, ValueError) as err:
            raise ValueError(f"encoder_kwargs {kwargs} cannot be written to {hub.CONFIG_FILE}: {err}") from err
        return {**self.config, "encoder_kwargs": kwargs}

    def _save_pretrained(self, save_directory: Path) -> None:
        """The mixin's weights file, written through a temporary file (contiguous tensors)."""
        hub.write_weights(self, Path(save_directory) / hub.WEIGHTS_FILE)

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """The model card: encoder, decoder and classes, plus ``dataset`` (the data-set section of config.json)
        and ``metrics`` when given (``save_pretrained(..., model_card_kwargs=dict(dataset=..., metrics=...))``)."""
        return hub.model_card(self.arguments, kwargs.get("dataset"), kwargs.get("metrics"), kwargs.get("source"))

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        map_location: str | torch.device = "cpu",
        **model_kwargs: Any,
    ) -> Segmentor:
        """The segmentor saved in a folder or a Hub repository, in eval mode on ``map_location``.

        The mixin's own loader is replaced (same arguments): it would load weights non-strictly, name no file
        in its errors and not read version 1 folders. ``model_kwargs`` override the saved arguments.

        Raises:
            FileNotFoundError: the folder, ``config.json`` or ``model.safetensors`` is missing (named).
            ValueError: a file cannot be read, or the config and the weights do not match (both named; the
                missing, unexpected and mis-shaped names listed).
        """
        where = dict(force_download=force_download, token=token, cache_dir=cache_dir,
                     local_files_only=local_files_only, revision=revision)
        config_path = hub.resolve_file(pretrained_model_name_or_path, hub.CONFIG_FILE, **where)
        weights_path = hub.resolve_file(pretrained_model_name_or_path, hub.WEIGHTS_FILE, **where)
        config = hub.read_config(config_path, DECODERS)
        return cls.from_files(config, config_path, weights_path, map_location, **model_kwargs)

    @classmethod
    def from_files(
        cls,
        config: dict[str, Any],
        config_path: Path,
        weights_path: Path,
        map_location: str | torch.device = "cpu",
        **model_kwargs: Any,
    ) -> Segmentor:
        """The segmentor of a ``config.json`` already read by :func:`seg.model.hub.read_config` and its weights file,
        in eval mode on ``map_location`` (``model_kwargs`` override the saved arguments)."""
        arguments = {**upgrade_arguments(config["model"], config["version"]), **model_kwargs}
        try:
            model = cls(**arguments)
        except Exception as err:
            raise ValueError(f"{config_path}: cannot build the segmentor from its arguments: "
                             f"{type(err).__name__}: {err}") from err
        state = upgrade_state(hub.read_weights(weights_path), model.decoder_name, str(weights_path))
        hub.load_weights(model, state, f"{weights_path} does not match the model described by {config_path}")
        return model.to(map_location).eval()


def _resize_crop(logits: Tensor, padded: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Resize logits (B, K, h, w) bilinearly to the padded input size, then crop to (B, K, H, W)."""
    if tuple(logits.shape[-2:]) != padded:
        logits = F.interpolate(logits, size=padded, mode="bilinear", align_corners=False)
    return logits[..., : size[0], : size[1]]

"""Tile configurations of the Triton kernels: the one list the launch plan chooses from and
``python -m seg.kernels.compile_check`` compiles.

Each head dim (padded to a power of two, ``d_pad``) and input kind (float32 with exact IEEE dots, or float16 /
bfloat16 with TF32 dots) has a short list of :class:`Tiles`, fastest first; each states the shared memory per
block it needs at most (``shared_bound``). The plan takes the first entry whose bound fits the device's
opt-in shared memory per block; ``compile_check`` compiles every entry for real GPU targets on CPU and fails
when a kernel needs more shared memory than its entry states, or when the entry chosen for a target does not
fit that target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "ARCH_SHARED_LIMIT",
    "HALF_DTYPES",
    "PAD_HEAD_DIMS",
    "Tiles",
    "choose_tiles",
    "device_shared_limit",
    "pad_head_dim",
    "tile_options",
]

KiB = 1024

# opt-in shared memory per block (bytes) of each compute capability the plan is checked for
ARCH_SHARED_LIMIT: dict[int, int] = {
    80: 163 * KiB, 86: 99 * KiB, 87: 163 * KiB, 89: 99 * KiB, 90: 227 * KiB, 100: 227 * KiB, 120: 99 * KiB,
}
PAD_HEAD_DIMS = (16, 32, 64, 128)
HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Tiles:
    """Launch parameters shared by the attention kernels of one call.

    Attributes:
        block: tokens per tile.
        chunk: columns of a (d, d) summary taken per dot (``DC``); below ``d_pad`` the backward summaries
            split the head dim over a third grid axis, and the other kernels loop over the chunks.
        num_warps: warps per program.
        num_stages: software-pipelining stages of the token loops.
        shared_bound: shared memory per block (bytes) this entry needs at most, on any target.
    """

    block: int
    chunk: int
    num_warps: int
    num_stages: int
    shared_bound: int

    def label(self) -> str:
        return f"BLOCK {self.block}, DC {self.chunk}, {self.num_warps} warps, {self.num_stages} stages"


# fastest first; TF32 dots (half inputs) keep their operands in shared memory and want wider tiles,
# IEEE float32 dots run on the FMA units, where wide tiles spill registers
_HALF: dict[int, tuple[Tiles, ...]] = {
    16: (Tiles(64, 16, 4, 2, 32 * KiB),),
    32: (Tiles(64, 32, 4, 2, 48 * KiB),),
    64: (Tiles(64, 64, 4, 2, 96 * KiB), Tiles(32, 64, 4, 1, 64 * KiB)),
    128: (Tiles(32, 128, 8, 1, 160 * KiB), Tiles(32, 64, 8, 1, 64 * KiB)),
}
_FLOAT32: dict[int, tuple[Tiles, ...]] = {
    16: (Tiles(32, 16, 4, 1, 32 * KiB),),
    32: (Tiles(32, 32, 4, 1, 48 * KiB),),
    64: (Tiles(32, 64, 4, 1, 96 * KiB), Tiles(32, 32, 4, 1, 64 * KiB)),
    128: (Tiles(32, 64, 8, 1, 96 * KiB), Tiles(16, 32, 4, 1, 64 * KiB)),
}
# Triton's interpreter runs every program in Python: small tiles; chunks below d_pad exercise the split
INTERPRETER_TILES = Tiles(32, 32, 4, 1, 0)


def pad_head_dim(d: int) -> int:
    """The head dim the kernels compute with: the next power of two, at least 16."""
    return max(16, 1 << (d - 1).bit_length())


def tile_options(d_pad: int, dtype: torch.dtype) -> tuple[Tiles, ...]:
    """Every tile configuration the plan may choose for padded head dim ``d_pad`` and input ``dtype``."""
    table = _HALF if dtype in HALF_DTYPES else _FLOAT32
    if d_pad not in table:
        raise ValueError(f"padded head dim {d_pad} is not one of {PAD_HEAD_DIMS}")
    return table[d_pad]


def choose_tiles(d_pad: int, dtype: torch.dtype, shared_limit: int) -> Tiles:
    """The first (fastest) configuration whose shared memory bound fits ``shared_limit`` bytes per block;
    the leanest one when none does (its launch error then sends the call to the reference)."""
    options = tile_options(d_pad, dtype)
    return next((tiles for tiles in options if tiles.shared_bound <= shared_limit), options[-1])


def device_shared_limit(device: torch.device) -> int:
    """Opt-in shared memory per block of a CUDA device (bytes), from its properties or its compute capability."""
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", 0)
    if limit:
        return int(limit)
    return ARCH_SHARED_LIMIT.get(props.major * 10 + props.minor, 99 * KiB)

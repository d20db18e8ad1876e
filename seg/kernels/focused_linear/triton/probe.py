"""The self-check the Triton kernels pass before they run a configuration: forward and backward on small
problems of that configuration, compared with the float64 reference.

A configuration is (device, dtype, padded head dim, whether n == N, focusing factor p): everything that picks a
different compiled kernel or a different branch inside one. For it the probe runs two problems, one with a masked
head dim (d < d_pad: the padded columns must stay out of every sum) and one with the full padded head dim (the last
column is real), the caller's own head dim among them. Each problem has 2 images and 2 heads, q, k and v strided as
channel slices of wider tensors (as the layer passes its fused projections), and enough tokens that every reduction
over tokens crosses at least three splits (:data:`PROBE_SPLITS` requested, one token block each), so the partial
sums over splits, the second image and the second head are all compared. Each result (output, dq, dk, dv, dscale)
must agree within the dtype's tolerance, relative to the largest reference magnitude.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from seg.kernels.focused_linear.triton import launch
from seg.kernels.focused_linear.triton.reference_grads import reference_with_grads

__all__ = ["PROBE_SPLITS", "TOLERANCE", "Config", "ProbeShape", "describe", "head_dims", "probe", "probe_shape",
           "scale_grad"]

PROBE_SPLITS = 4  # splits per token reduction in the probe's problems
# relative error (largest absolute error over the largest reference magnitude) the probe accepts, per dtype
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
RESULTS = ("output", "dq", "dk", "dv", "dscale")


class Config(NamedTuple):
    """What a verdict is kept for."""

    device: str
    dtype: torch.dtype
    d_pad: int  # head dim as the kernels compute it (next power of two, >= 16)
    same_length: bool  # n == N (global keys) or n < N (spatial reduction)
    p: float  # focusing factor


class ProbeShape(NamedTuple):
    """The size of one probe problem: q (B, N, h * d), k and v (B, n, h * d)."""

    B: int
    h: int
    N: int
    n: int


def probe_shape(same_length: bool, block: int) -> ProbeShape:
    """Two images, two heads; N queries over four token blocks and n keys over three (or n == N), so that
    every reduction over tokens crosses at least three splits under :data:`PROBE_SPLITS`."""
    N = 3 * block + 5
    return ProbeShape(B=2, h=2, N=N, n=N if same_length else 2 * block + 7)


def head_dims(d_pad: int, d: int) -> tuple[int, int]:
    """A masked and an unmasked head dim for padded head dim ``d_pad``, the caller's ``d`` among them."""
    return (d if d < d_pad else d_pad - 3), d_pad


def describe(config: Config) -> str:
    """The configuration in words, for warnings."""
    length = "n == N" if config.same_length else "n < N"
    return f"{config.device}, {str(config.dtype).removeprefix('torch.')}, head dim <= {config.d_pad}, {length}, " \
           f"p = {config.p:g}"


def inverse_temperature(scale: Tensor) -> Tensor:
    """1 / softplus(scale) as the kernels take it: (C,) float32."""
    return launch.inverse_temperature(scale, scale.numel(), scale.device)


def scale_grad(grad_inv_temp: Tensor, scale: Tensor) -> Tensor:
    """dL/dscale from dL/d(1 / T): d(1 / softplus(s)) / ds = -sigmoid(s) / softplus(s)^2."""
    s = scale.reshape(-1).to(torch.float32)
    return (-grad_inv_temp * torch.sigmoid(s) / F.softplus(s).square()).reshape(scale.shape).to(scale.dtype)


def _relative_error(got: Tensor, want: Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _problem(config: Config, d: int, seed: int) -> tuple[int, list[Tensor], Tensor]:
    """Heads h; q, k, v, grad_out in the config's dtype (on its device); scale (1, 1, h * d) float64. q, k and v
    are channel slices of wider tensors, strided as the layer passes its fused projections."""
    block = launch.plan_tiles(torch.device(config.device), config.d_pad, config.dtype).block
    B, h, N, n = probe_shape(config.same_length, block)
    C = h * d
    gen = torch.Generator().manual_seed(seed)
    q2, kv, grad_out = (torch.randn(B, t, c, generator=gen, dtype=torch.float64) for t, c in ((N, 2 * C), (n, 2 * C),
                                                                                              (N, C)))
    scale = torch.randn(1, 1, C, generator=gen, dtype=torch.float64) * 0.5
    q2, kv, grad_out = (t.to(device=config.device, dtype=config.dtype) for t in (q2, kv, grad_out))
    return h, [q2[..., :C], kv[..., :C], kv[..., C:], grad_out], scale.to(config.device)  # (B, T, C) views


def _compare(config: Config, d: int, seed: int) -> str | None:
    """One problem with head dim ``d``: None when the kernels agree, else the first disagreement."""
    h, (q, k, v, grad_out), scale = _problem(config, d, seed)
    try:
        out, *saved = launch.forward(q, k, v, inverse_temperature(scale), h, config.p, splits=PROBE_SPLITS)
        grads = launch.backward(grad_out, q, k, v, inverse_temperature(scale), tuple(saved), h, config.p,
                                splits=PROBE_SPLITS)
        got = (out, *grads[:3], scale_grad(grads[3], scale))
    except Exception as err:  # a kernel that fails to compile or launch
        return f"the Triton kernels failed for {describe(config)}: {type(err).__name__}: {err}"
    # the reference sees the same rounded inputs, in float64
    want = reference_with_grads(grad_out.double(), q.double(), k.double(), v.double(), scale, h, config.p)
    for name, a, b in zip(RESULTS, got, want, strict=True):
        err = _relative_error(a, b)
        if not err <= TOLERANCE[config.dtype]:
            return f"the Triton kernels disagree with the float64 reference for {describe(config)} ({name} at " \
                   f"head dim {d}: relative error {err:.1e} > {TOLERANCE[config.dtype]:.0e})"
    return None


def probe(config: Config, d: int) -> str | None:
    """Kernels against the float64 reference for ``config`` (``d``: the caller's head dim): None when every
    result of both problems agrees within the dtype's tolerance, else the reason not to use them."""
    for seed, head_dim in enumerate(head_dims(config.d_pad, d)):
        reason = _compare(config, head_dim, seed)
        if reason is not None:
            return reason
    return None

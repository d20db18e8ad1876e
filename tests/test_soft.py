"""SOFT: the Newton-Raphson inverse, the attention against dense references, and the SOFT encoders."""

from __future__ import annotations

from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F

import seg  # noqa: F401  (registers the encoders)
import seg.model.backbones.soft  # noqa: F401  (registers soft_* even before seg.model.backbones imports it)
from seg.model.layers.soft import SoftAttention, gaussian_kernel, newton_inverse, newton_pinv, soft_attention

torch.manual_seed(0)


def kernel_matrix(m: int, spread: float, batch: int = 4, seed: int = 0) -> torch.Tensor:
    """Gaussian kernel matrices (batch, m, m) of m random 32-d points with per-coordinate std ``spread``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, m, 32, generator=gen, dtype=torch.float64) * spread
    return gaussian_kernel(x, x)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest Frobenius relative error over the batch."""
    return ((a - b).norm(dim=(-2, -1)) / b.norm(dim=(-2, -1))).max().item()


# ---------------------------------------------------------------- Newton-Raphson inverse


def test_gaussian_kernel_equals_pairwise_distances() -> None:
    x, y = torch.randn(2, 7, 5, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
    expected = torch.exp(-0.5 * torch.cdist(x, y).square())
    torch.testing.assert_close(gaussian_kernel(x, y), expected, rtol=1e-12, atol=1e-14)


def test_newton_inverse_well_conditioned() -> None:
    b = kernel_matrix(49, spread=0.3)  # eigenvalues 0.49 .. 5.2
    ridge = b + 0.01 * torch.eye(49, dtype=b.dtype)
    assert rel_err(newton_inverse(b), torch.linalg.inv(ridge)) < 1e-13  # measured 5.3e-16
    assert rel_err(newton_inverse(b.float()).double(), torch.linalg.inv(ridge)) < 2e-6  # measured 2.1e-7
    # against the exact inverse of B itself the ridge 0.01 I is all that is left: ~1 %
    assert 0.005 < rel_err(newton_inverse(b), torch.linalg.pinv(b)) < 0.02  # measured 0.0135


def test_newton_inverse_ill_conditioned_acts_as_a_generalised_inverse() -> None:
    b = kernel_matrix(49, spread=0.03)  # eigenvalues 1.6e-4 .. 47.7: cond(B + 0.01 I) ~ 4.7e3
    ridge = b + 0.01 * torch.eye(49, dtype=b.dtype)
    v20 = newton_inverse(b.float()).double()
    # 20 iterations leave the smallest eigen-directions unconverged (a truncated inverse) ...
    assert rel_err(v20, torch.linalg.inv(ridge)) > 0.5  # measured 0.88
    # ... which is what A pinv(B) A^T needs: B V B = B up to 0.2 %
    assert rel_err(b @ v20 @ b, b) < 3e-3  # measured 1.3e-3
    torch.testing.assert_close(v20, v20.transpose(-2, -1), rtol=0, atol=1e-3)
    assert torch.linalg.eigvalsh(v20).abs().max() < 25  # measured 18.3; the exact ridge inverse reaches 98
    # more iterations converge to the ridge inverse (quadratic convergence once alpha * lambda^2 is O(1))
    assert rel_err(newton_inverse(b, iters=30), torch.linalg.inv(ridge)) < 1e-12  # measured 6.5e-14
    assert rel_err(newton_inverse(b.float(), iters=30).double(), torch.linalg.inv(ridge)) < 1e-4  # 3.6e-5


def test_custom_backward_gradcheck_float64() -> None:
    b = kernel_matrix(6, spread=0.2, batch=2).requires_grad_()
    assert torch.autograd.gradcheck(newton_pinv, (b,), eps=1e-6, atol=1e-7, rtol=1e-6)
    # the backward is the analytic one: one node, no graph through the 20 iterations
    assert type(newton_pinv(b).grad_fn).__name__ == "NewtonInverseBackward"


def test_soft_attention_gradcheck_float64() -> None:
    q = (torch.randn(1, 2, 10, 4, dtype=torch.float64) * 0.5).requires_grad_()
    landmarks = (torch.randn(1, 2, 3, 4, dtype=torch.float64) * 0.5).requires_grad_()
    v = torch.randn(1, 2, 10, 4, dtype=torch.float64, requires_grad=True)
    for normalize in (False, True):
        fn = lambda q, lm, v, normalize=normalize: soft_attention(q, lm, v, normalize=normalize)
        assert torch.autograd.gradcheck(fn, (q, landmarks, v), eps=1e-6, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- the attention against dense references


def dense_soft(q: torch.Tensor, landmarks: torch.Tensor, v: torch.Tensor, normalize: bool) -> torch.Tensor:
    """A pinv(B) A^T V with the N x N matrix formed explicitly and torch.linalg.inv(B + 0.01 I), per head."""
    out = torch.empty_like(v)
    for b in range(q.shape[0]):
        for i in range(q.shape[1]):
            a = torch.exp(-0.5 * torch.cdist(q[b, i], landmarks[b, i]).square())  # (N, m)
            kb = torch.exp(-0.5 * torch.cdist(landmarks[b, i], landmarks[b, i]).square())  # (m, m)
            inv = torch.linalg.inv(kb + 0.01 * torch.eye(kb.shape[0], dtype=kb.dtype))
            if normalize:
                scale = torch.diag(kb.sum(-1).rsqrt())
                inv = scale @ inv @ scale
            out[b, i] = (a @ inv @ a.T) @ v[b, i]  # (N, N) @ (N, d)
    return out


@pytest.mark.parametrize("normalize", [False, True])
def test_soft_attention_equals_dense_reference(normalize: bool) -> None:
    q, v = torch.randn(2, 3, 50, 8, dtype=torch.float64), torch.randn(2, 3, 50, 8, dtype=torch.float64)
    landmarks = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    got = soft_attention(q, landmarks, v, normalize=normalize)
    torch.testing.assert_close(got, dense_soft(q, landmarks, v, normalize), rtol=1e-10, atol=1e-10)


def module_reference(attn: SoftAttention, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The whole module written out per head: projections, d^-1/4, bottleneck, dense attention, DWConv."""
    B, N, C = x.shape
    H, W = size
    h, d, s = attn.num_heads, attn.head_dim, attn.sr_ratio
    q = (x @ attn.q.weight.T + attn.q.bias) / d**0.25
    v = x @ attn.v.weight.T + attn.v.bias
    out = torch.zeros_like(q)
    for b in range(B):
        for i in range(h):
            qi = q[b, :, i * d:(i + 1) * d]  # (N, d)
            grid = qi.T.reshape(d, H, W)
            Hm, Wm = -(-H // s), -(-W // s)
            lm = torch.empty(Hm * Wm, d, dtype=x.dtype)
            for r in range(Hm):
                for c in range(Wm):
                    patch = grid[:, r * s:(r + 1) * s, c * s:(c + 1) * s]  # clipped at the border
                    if attn.landmarks == "pool":
                        lm[r * Wm + c] = patch.mean(dim=(1, 2))
                    else:  # zero padding: the conv sees only the in-map part of the window
                        w = attn.landmark.weight[:, :, : patch.shape[1], : patch.shape[2]]
                        lm[r * Wm + c] = (w * patch).sum(dim=(1, 2, 3))
            if attn.landmarks == "conv":
                lm = F.gelu(F.layer_norm(lm, (d,), attn.landmark_norm.weight, attn.landmark_norm.bias))
            vi = v[b, :, i * d:(i + 1) * d]
            y = dense_soft(qi[None, None], lm[None, None], vi[None, None], attn.normalize)[0, 0]
            kernel = attn.dwc.weight[i : i + 1].expand(d, 1, -1, -1)  # the head's filter, for each channel
            dw = F.conv2d(vi.T.reshape(1, d, H, W), kernel, padding=kernel.shape[-1] // 2, groups=d)
            out[b, :, i * d:(i + 1) * d] = y + dw.reshape(d, N).T
    return out @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("landmarks", ["conv", "pool"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize(("size", "sr"), [((7, 9), 4), ((6, 6), 2), ((5, 3), 1)])
def test_module_equals_dense_reference(landmarks: str, normalize: bool, size: tuple[int, int], sr: int) -> None:
    torch.manual_seed(1)
    attn = SoftAttention(24, 3, sr_ratio=sr, kernel_size=3, landmarks=landmarks, normalize=normalize).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # move away from the init so every term matters
    x = torch.randn(2, size[0] * size[1], 24, dtype=torch.float64)
    torch.testing.assert_close(attn(x, size), module_reference(attn, x, size), rtol=1e-9, atol=1e-9)


def test_dwconv_kernel_follows_the_published_stages() -> None:
    assert [SoftAttention(64, 2, sr).dwc.kernel_size for sr in (8, 4, 2, 1)] == [(9, 9), (5, 5), (3, 3), (3, 3)]
    assert SoftAttention(64, 2, 8).dwc.weight.shape == (2, 1, 9, 9)  # one filter per head


@pytest.mark.parametrize(("size", "sr", "m"), [((7, 9), 4, 6), ((13, 6), 8, 2), ((1, 1), 8, 1), ((5, 5), 2, 9)])
def test_shapes_at_odd_sizes(size: tuple[int, int], sr: int, m: int) -> None:
    attn = SoftAttention(32, 2, sr_ratio=sr)
    x = torch.randn(2, size[0] * size[1], 32)
    q = attn.q(x).reshape(2, -1, 2, 16).transpose(1, 2)
    assert attn.bottleneck(q, size).shape == (2, 2, m, 16)  # m = ceil(H / sr) * ceil(W / sr)
    out = attn(x, size)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_bf16_autocast_is_finite_and_close_to_fp32() -> None:
    torch.manual_seed(2)
    attn = SoftAttention(64, 2, sr_ratio=4, normalize=True)
    x = torch.randn(2, 20 * 28, 64) * 5.0
    expected = attn(x, (20, 28))
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attn(x, (20, 28))
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert rel_err(got.float()[None], expected[None]) < 0.03
    got.float().square().mean().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters())


# ---------------------------------------------------------------- encoders


@pytest.mark.parametrize(
    ("name", "published_m"),
    [("soft_tiny", 13.07), ("soft_small", 38.86), ("soft_medium", 45.81), ("soft_small_norm", 38.86),
     ("soft_medium_norm", 45.81)],
)
def test_parameter_counts_match_published(name: str, published_m: float) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - published_m) < 0.005, count  # the classifier has no output norms: the published count


@pytest.mark.parametrize("size", [(64, 96), (33, 47), (32, 32)])
def test_features_at_any_size(size: tuple[int, int]) -> None:
    model = timm.create_model("test_soft", features_only=True).eval()
    with torch.no_grad():
        feats = model(torch.randn(2, 3, *size))
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert [f.shape[1] for f in feats] == model.feature_info.channels() == [16, 32, 48, 64]
    for f, stride in zip(feats, (4, 8, 16, 32), strict=True):
        assert list(f.shape[2:]) == [-(-s // stride) for s in size]  # stride-2 convs with padding 1 ceil
        assert torch.isfinite(f).all()
        # per-stage LayerNorm at init: zero mean over channels
        torch.testing.assert_close(f.mean(dim=1), torch.zeros_like(f[:, 0]), atol=1e-4, rtol=0)


def test_features_only_drops_classifier_and_final_norm() -> None:
    model = timm.create_model("test_soft", features_only=True)
    names = {name for name, _ in model.model.named_parameters()}  # inside timm's FeatureGetterNet
    assert not any(n.startswith(("head.", "norm.")) for n in names)
    assert "cls_token" in names  # the class token still takes part in stage-4 attention


def test_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(3)
    model = timm.create_model("test_soft", features_only=True).train()
    feats = model(torch.randn(2, 3, 64, 96))
    sum(f.square().mean() for f in feats).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_classifier_logits() -> None:
    model = timm.create_model("test_soft", num_classes=7).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 80))
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()


def test_smp_upernet_forward_backward() -> None:
    model = smp.UPerNet(encoder_name="tu-test_soft", encoder_weights=None, classes=5).train()
    x = torch.randn(2, 3, 64, 96)
    out = model(x)
    assert out.shape == (2, 5, 64, 96)
    out.square().mean().backward()
    grads = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------- published checkpoints

# this model's name pieces -> the published ones (block{i}.{j}.att.mha.* of the released SOFT files)
PUBLISHED_NAMES = {
    ".attn.q.": ".att.mha.W_q.",
    ".attn.v.": ".att.mha.W_v.",
    ".attn.landmark.": ".att.mha.attn.Qlandmark_op.",
    ".attn.landmark_norm.": ".att.mha.attn.Qnorm_act.0.",
    ".attn.dwc.": ".att.mha.attn.conv.",
    ".attn.proj.": ".att.mha.ff.",
    ".mlp.fc1.": ".att.ff1.",
    ".mlp.fc2.": ".att.ff2.",
    ".norm1.": ".att.norm1.",
    ".norm2.": ".att.norm2.",
}


def published_name(name: str) -> str:
    if name.startswith(("block1.", "block2.", "block3.")):  # stage 4 keeps PVT's names
        for ours, theirs in PUBLISHED_NAMES.items():
            if ours in name:
                return name.replace(ours, theirs)
    return name


def test_published_checkpoint_loads_and_reproduces_logits(tmp_path: Path) -> None:
    torch.manual_seed(4)
    source = timm.create_model("test_soft").eval()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    released = {published_name(k): v for k, v in source.state_dict().items() if not k.startswith("norm")}
    released.update({k: v for k, v in source.state_dict().items() if k.startswith("norm.")})  # final norm only
    assert any(".att.mha.attn.Qlandmark_op." in k for k in released)
    path = tmp_path / "soft.pth"
    torch.save({"state_dict": released, "epoch": 300}, path)
    loaded = timm.create_model("test_soft", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))
    assert not hasattr(loaded, "norm1")  # output norms: in feature models only, at their initial values
    features = timm.create_model("test_soft", features_only=True, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(path)))
    assert features.model.norm1.weight.eq(1).all() and features.model.norm4.bias.eq(0).all()


def test_pvt_skeleton_with_soft_stages() -> None:
    model = timm.create_model("test_flatten_pvt", features_only=True, attn_type="GGGS")
    attn = model.model.block1[0].attn
    assert isinstance(attn, SoftAttention) and attn.normalize and attn.sr_ratio == 8
    feats = model(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape[2:]) for f in feats] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    sum(f.square().mean() for f in feats).backward()
    assert all(p.grad is not None for p in model.parameters())

"""Building blocks of SAN (Dai et al., CVPR 2019): second-order channel attention and region-level non-local
attention, with the arithmetic of the published daitao/SAN code and its MPNCOV covariance layers, computed in
memory that grows linearly with the feature map.

- `covariance(x)`: the channel covariance of a feature map, X I_hat X^T with the centring matrix
  I_hat = I/M - 1/M^2 (M = h*w), computed as (X - mean)(X - mean)^T / M without the M x M matrix.
- `newton_schulz_sqrt(cov, iters)`: MPNCOV's matrix square root as published (trace pre-normalisation,
  iters - 1 coupled Newton-Schulz steps, a closing half step, sqrt(trace) post-compensation).
- `SecondOrderChannelAttention` (published SOCA), `RegionNonLocal` (published Nonlocal_CA with its
  NONLocalBlock2D): module and parameter names as published, so released state dicts fit.
"""

from __future__ import annotations

import torch
from torch import nn

from nlsr.model import common
from nlsr.model.attention import softmax_attention

# SOCA's covariance window: a side of at least this many pixels is cropped to it (centred), as published.
COVARIANCE_WINDOW = 1000
# Newton-Schulz iterations of SOCA's square root in the published network.
SQRT_ITERATIONS = 5


def covariance(x: torch.Tensor) -> torch.Tensor:
    """(b, c, c) channel covariance of x (b, c, h, w) over its h*w positions, divided by h*w (MPNCOV's
    Covpool, computed from the centred features instead of an (h*w) x (h*w) centring matrix)."""
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1)
    centred = flat - flat.mean(dim=2, keepdim=True)
    return centred.bmm(centred.transpose(1, 2)) / flat.shape[2]


def newton_schulz_sqrt(cov: torch.Tensor, iters: int) -> torch.Tensor:
    """MPNCOV's Sqrtm forward as published: A = cov / trace(cov); Y0 = A (3I - A) / 2, Z0 = (3I - A) / 2;
    then iters - 2 steps T = (3I - Z Y) / 2, Y <- Y T, Z <- T Z, and a last half step Y (3I - Z Y) / 2,
    times sqrt(trace(cov)). With iters < 2 the published code returns (3I - A) / 2 * sqrt(trace), kept as is.
    Differentiable through autograd (the published layer's hand-written backward is the same gradient)."""
    b, d, _ = cov.shape
    eye3 = 3.0 * torch.eye(d, dtype=cov.dtype, device=cov.device).expand(b, d, d)
    norm = cov.diagonal(dim1=1, dim2=2).sum(dim=1).view(b, 1, 1)
    a = cov / norm
    zy = 0.5 * (eye3 - a)
    if iters >= 2:
        y, z = a.bmm(zy), zy
        for _ in range(1, iters - 1):
            zy = 0.5 * (eye3 - z.bmm(y))
            y, z = y.bmm(zy), zy.bmm(z)
        zy = 0.5 * y.bmm(eye3 - z.bmm(y))
    return zy * norm.sqrt()


def covariance_window(x: torch.Tensor, size: int = COVARIANCE_WINDOW) -> torch.Tensor:
    """The part of x whose covariance SOCA takes: all of it when both sides are under `size`, else a centred
    `size` crop of the longer sides, with the published slicing (a side of exactly `size` beside a shorter
    one falls to the last branch, where Python's slicing with a negative start keeps the published rows)."""
    h, w = x.shape[-2:]
    if h < size and w < size:
        return x
    if h < size and w > size:
        left = (w - size) // 2
        return x[:, :, :, left:left + size]
    if w < size and h > size:
        top = (h - size) // 2
        return x[:, :, top:top + size, :]
    top, left = (h - size) // 2, (w - size) // 2
    return x[:, :, top:top + size, left:left + size]


class SecondOrderChannelAttention(nn.Module):
    """SOCA: x * sigmoid(conv(relu(conv(column means of sqrt(covariance(window of x)))))); keys
    conv_du.0.* and conv_du.2.*. The covariance and its square root are computed in float32 (float64 for
    float64 input) whatever the autocast or weight precision."""

    def __init__(self, channel: int, reduction: int = 8, iters: int = SQRT_ITERATIONS) -> None:
        super().__init__()
        self.iters = iters
        self.conv_du = common.squeeze_excitation(channel, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        # Statistics in float32 at least, also under autocast or half weights: the iteration divides by the trace.
        with torch.autocast(x.device.type, enabled=False):
            window = covariance_window(x)
            root = newton_schulz_sqrt(covariance(window.to(torch.promote_types(window.dtype, torch.float32))),
                                      self.iters)
        return self.conv_du(root.mean(dim=1).view(b, c, 1, 1).to(x.dtype)) * x


class EmbeddedGaussianNonLocal(nn.Module):
    """The published NONLocalBlock2D (embedded Gaussian, no batch norm): x + W(softmax(theta(x) phi(x)^T) g(x)),
    theta on every position, phi and g max-pooled 2x2 (the published block pools although SAN asks it not to:
    its 2-D branch rebinds `sub_sample` to a class, which is true). Unscaled scores.

    Computed by model.attention.softmax_attention (scaled_dot_product_attention on inputs its memory-efficient
    kernels take), which never holds the (h*w) x (h*w/4) score matrix: a whole image runs in linear memory."""

    def __init__(self, in_channels: int, inter_channels: int) -> None:
        super().__init__()
        self.inter_channels = inter_channels
        # Registration order fixes the state-dict order: g, W, theta, phi.
        self.g = nn.Sequential(nn.Conv2d(in_channels, inter_channels, 1), nn.MaxPool2d(kernel_size=2))
        self.W = nn.Conv2d(inter_channels, in_channels, 1)
        nn.init.zeros_(self.W.weight)
        nn.init.zeros_(self.W.bias)
        self.theta = nn.Conv2d(in_channels, inter_channels, 1)
        self.phi = nn.Sequential(nn.Conv2d(in_channels, inter_channels, 1), nn.MaxPool2d(kernel_size=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        if h < 2 or w < 2:  # no key survives the pooling (the published block fails): an empty sum, 0
            y = x.new_zeros(b, self.inter_channels, h, w)
        else:
            query = self.theta(x).flatten(2).transpose(1, 2)  # (b, h*w, c')
            key = self.phi(x).flatten(2).transpose(1, 2)  # (b, h*w/4, c')
            value = self.g(x).flatten(2).transpose(1, 2)
            y = softmax_attention(query, key, value).transpose(1, 2).reshape(b, self.inter_channels, h, w)
        return self.W(y) + x


class RegionNonLocal(nn.Module):
    """The published Nonlocal_CA: the feature map cut into quarters at (int(h/2), int(w/2)), the same non-local
    block run on each quarter separately. (The published module also builds a SOCA, `soca.*`, that its
    forward never calls: SAN.unused_keys names it; it is not built here.)"""

    def __init__(self, in_feat: int = 64, inter_feat: int = 32) -> None:
        super().__init__()
        self.non_local = EmbeddedGaussianNonLocal(in_feat, inter_feat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        h1, w1 = int(h / 2), int(w / 2)
        rows = [self._row(x[:, :, :h1], w1), self._row(x[:, :, h1:], w1)]
        return torch.cat([r for r in rows if r is not None], dim=2)

    def _row(self, band: torch.Tensor, w1: int) -> torch.Tensor | None:
        """Left and right quarters of one band, each through the block (empty parts skipped)."""
        if band.shape[2] == 0:
            return None
        parts = [band[..., :w1], band[..., w1:]]
        return torch.cat([self.non_local(p) for p in parts if p.shape[3] > 0], dim=3)

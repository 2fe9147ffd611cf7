"""Split finding in torch: bincount (scatter-add) histograms, prefix sums, every candidate's gain at once; CPU and CUDA."""
from __future__ import annotations

import torch

from core.ops.split_finding import MISSING, SplitResult, empty_result
from registry import Kernel

SLOTS = 256


def _score(g: torch.Tensor, h: torch.Tensor, reg_lambda: float, reg_alpha: float) -> torch.Tensor:
    t = torch.sign(g) * (g.abs() - reg_alpha).clamp_min(0.0)
    den = h + reg_lambda
    return torch.where(den > 0, t * t / torch.where(den > 0, den, 1.0), 0.0)


def histograms(bins: torch.Tensor, grad: torch.Tensor, hess: torch.Tensor, node_ids: torch.Tensor,
               num_nodes: int) -> torch.Tensor:
    """[num_nodes, F, 256, 2] float64 sums of (grad, hess), one slot per uint8 value (255: the missing rows).

    One weighted bincount per feature and statistic (index_add_ with a two-column source is several times
    slower on the CPU), so the index tensor is [N] rather than [N, F]. Rows with node -1 land in an extra
    node that is dropped, which costs less than selecting the active rows."""
    F = bins.shape[1]
    size = (num_nodes + 1) * SLOTS
    base = torch.where(node_ids < 0, num_nodes, node_ids).to(torch.int64) * SLOTS
    parts = []
    for f in range(F):
        slot = base + bins[:, f]
        parts += [torch.bincount(slot, weights=w, minlength=size) for w in (grad, hess)]
    # .to: bincount of no rows gives float32 zeros whatever the weights' dtype
    hist = torch.stack(parts).to(torch.float64).view(F, 2, num_nodes + 1, SLOTS)
    return hist[:, :, :num_nodes].permute(2, 0, 3, 1)


def split_finding(bins: torch.Tensor, grad: torch.Tensor, hess: torch.Tensor, node_ids: torch.Tensor, *,
                  num_nodes: int, num_bins: int, reg_lambda: float, reg_alpha: float, gamma: float,
                  min_child_weight: float) -> SplitResult:
    """Histograms by weighted bincount (float64), prefix sums over the bins, the gains of all [node, feature,
    threshold, missing direction] candidates, and the first maximum in the tie order."""
    M, B, F = num_nodes, num_bins, bins.shape[1]
    out = empty_result(M, bins.device)
    if B < 2 or F == 0:
        return out
    hist = histograms(bins, grad.to(torch.float64), hess.to(torch.float64), node_ids, M)  # [M, F, 256, 2]
    parent = hist[:, 0].sum(dim=1)  # [M, 2] node totals, from feature 0 (every row has a slot there)
    left = hist[:, :, :B - 1].cumsum(dim=2)  # [M, F, T, 2], T = B - 1 thresholds
    left = torch.stack([left, left + hist[:, :, MISSING:]], dim=3)  # [M, F, T, d, 2]: missing right, missing left
    GL, HL = left[..., 0], left[..., 1]
    G, H = parent[:, 0, None, None, None], parent[:, 1, None, None, None]
    GR, HR = G - GL, H - HL
    gain = (_score(GL, HL, reg_lambda, reg_alpha) + _score(GR, HR, reg_lambda, reg_alpha)
            - _score(G, H, reg_lambda, reg_alpha))
    valid = (HL >= min_child_weight) & (HR >= min_child_weight) & (gain > gamma)
    flat = torch.where(valid, gain, float("-inf")).reshape(M, -1)  # (feature, threshold, d) order
    best = flat.max(dim=1).values
    # the first index holding the maximum, explicitly (argmax's tie order is not promised on every device)
    order = torch.arange(flat.shape[1], device=bins.device)
    first = torch.where(flat == best[:, None], order, flat.shape[1]).min(dim=1).values
    found = torch.isfinite(best)
    first = torch.where(found, first, 0)
    f, rest = first // (2 * (B - 1)), first % (2 * (B - 1))
    t, d = rest // 2, rest % 2
    rows = torch.arange(M, device=bins.device)

    def pick(x: torch.Tensor) -> torch.Tensor:
        return torch.where(found, x[rows, f, t, d], 0.0)

    return SplitResult(
        feature=torch.where(found, f, -1), threshold=torch.where(found, t, -1), default_left=found & (d == 1),
        gain=pick(gain), left_grad=pick(GL), left_hess=pick(HL), right_grad=pick(GR), right_hess=pick(HR))


MAX_CANDIDATE_BYTES = 4 << 30
_CANDIDATE_TENSORS = 10  # float64 [M, F, T, 2] temporaries alive at once in the gain computation, about


def _check(bins: torch.Tensor, grad: torch.Tensor, hess: torch.Tensor, node_ids: torch.Tensor, *, num_nodes: int,
           num_bins: int, **attrs: object) -> list[str]:
    need = num_nodes * bins.shape[1] * max(num_bins - 1, 0) * 2 * 8 * _CANDIDATE_TENSORS
    if need > MAX_CANDIDATE_BYTES:
        return [f"its vectorized gains over num_nodes x F x (num_bins - 1) x 2 candidates would need about "
                f"{need / 2**30:.1f} GiB, over its limit of {MAX_CANDIDATE_BYTES / 2**30:.0f} GiB"]
    return []


KERNELS = [
    Kernel(op="split_finding", backend="torch", fn=split_finding, devices={"cpu", "cuda"},
           dtypes={torch.float32, torch.float64}, priority=10, check=_check,
           description="bincount histograms [nodes, F, bins + 1, 2], prefix sums, vectorized gains and tie rule"),
]

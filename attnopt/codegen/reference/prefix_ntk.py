"""Plain-torch prefix-NTK attention (ALGORITHMS.md §5): the oracle, the feature map, and how
``Z, z`` start and are fitted.

Contract shared by every prefix-NTK kernel:

- ``q``: ``(B, H, N, D)``; ``k``: ``(B, Hkv, M, D)``; ``v``: ``(B, Hkv, M, Dv)``: the per-input
  keys and values only (the prefix is gone); ``fq``: ``(B, H, N, D')`` holding φ(q); ``Z``:
  ``(H, D', Dv)``; ``z``: ``(H, D')``. ``causal`` as in the exact contract (bottom-right over
  the ``M`` input keys; the prefix is seen by every query).
- ``y_i = (Σ_j e^{s q_i·k_j − c_i} v_j + e^{−c_i} φ(q_i)ᵀZ) / (Σ_j e^{s q_i·k_j − c_i} +
  e^{−c_i} φ(q_i)ᵀz)``, ``c_i`` the row max (never ``e^{c}``: it overflows); ``φ(q_i)ᵀz``
  counts as ``max(φ(q_i)ᵀz, 0)``: a trained ``z`` may turn negative, a softmax mass may not.
- Returns ``(B, H, N, Dv)`` in ``q.dtype``, computed in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnopt.codegen.reference.exact import structural_keep


def feature_map(x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``φ(x) = elu(x W / d^{1/4}) + 1`` per head (``weight`` ``(H, D, D')``; None: W = I)."""
    xf = x.float() / x.shape[-1] ** 0.25
    if weight is not None:
        xf = torch.einsum("bhnd,hdf->bhnf", xf, weight.float())
    return F.elu(xf) + 1


def feature_weight(heads: int, head_dim: int, feature_dim: int, seed: int = 0) -> torch.Tensor:
    """``(H, D, D')``: the identity on the first ``D`` features, fixed random directions
    (``N(0, 1/D)``) on the others, so ``D' > D`` gives the fit more functions to use."""
    weight = torch.eye(head_dim, feature_dim)
    extra = feature_dim - head_dim
    if extra > 0:
        gen = torch.Generator().manual_seed(seed)
        weight[:, head_dim:] = torch.randn(head_dim, extra, generator=gen) / head_dim**0.5
    return weight.expand(heads, -1, -1).clone()


def query_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """kv-head tensors ``(B, Hkv, ...)`` repeated to ``heads`` query heads, in fp32."""
    group = heads // t.shape[1]
    return t.float().repeat_interleave(group, dim=1) if group > 1 else t.float()


def prefix_ntk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    Z: torch.Tensor,
    z: torch.Tensor,
    *,
    scale: float,
    causal: bool = False,
) -> torch.Tensor:
    """The formula of the module docstring, written out over the full score matrix."""
    heads = q.shape[1]
    kf, vf = query_heads(k, heads), query_heads(v, heads)
    scores = (q.float() @ kf.transpose(-2, -1)) * scale
    if causal:
        keep = structural_keep(q.shape[-2], k.shape[-2], True, 0, q.device)
        scores = scores.masked_fill(~keep, float("-inf"))
    c = scores.amax(dim=-1, keepdim=True).clamp_min(-1e30)  # no visible key: c finite
    w = torch.exp(scores - c)
    shift = torch.exp(-c)
    numerator = w @ vf + shift * torch.einsum("bhnf,hfe->bhne", fq.float(), Z.float())
    prefix_mass = (fq.float() @ z.float()[None, :, :, None]).clamp_min(0.0)
    denominator = w.sum(-1, keepdim=True) + shift * prefix_mass
    return (numerator / denominator).to(q.dtype)


def prefix_state(fk: torch.Tensor, pv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``Z = Σ_p φ(k_p) v_pᵀ``, ``z = Σ_p φ(k_p)`` from ``fk`` ``(H, P, D')``, ``pv``
    ``(H, P, Dv)``: the linear-attention start of the fit."""
    return fk.float().transpose(-2, -1) @ pv.float(), fk.float().sum(dim=-2)


def fit_prefix_state(
    q: torch.Tensor,
    fq: torch.Tensor,
    pk: torch.Tensor,
    pv: torch.Tensor,
    lse: torch.Tensor,
    start: tuple[torch.Tensor, torch.Tensor],
    *,
    scale: float,
    ridge: float = 1e-4,
    chunk: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Z, z`` by ridge least squares so that ``φ(q)ᵀ[Z | z]`` matches the prefix's terms
    ``Σ_p e^{s q·k_p} [v_p | 1]`` on the calibration queries ``q``.

    Each query's row is divided by its whole softmax denominator (prefix and the input keys,
    whose log-sum-exp is ``lse`` ``(B, H, N)``), so the fit weighs errors as they reach the
    output; the ridge pulls toward ``start`` (``prefix_state``). ``pk``/``pv``: ``(Hkv, P, ·)``.
    Solved in fp64 per head; the prefix is read in chunks of ``chunk`` tokens (two passes), so
    memory stays ``O(B·H·N·chunk)`` however long it is."""
    heads = q.shape[1]
    pk, pv = query_heads(pk[None], heads)[0].double(), query_heads(pv[None], heads)[0].double()
    qd = q.double()

    def scores(start: int) -> torch.Tensor:  # (B, H, N, chunk)
        return (qd @ pk[:, start : start + chunk].transpose(-2, -1)[None]) * scale

    starts = range(0, pk.shape[1], chunk)
    lse_prefix = torch.stack([scores(i).logsumexp(dim=-1) for i in starts]).logsumexp(dim=0)
    log_total = torch.logaddexp(lse.double(), lse_prefix)
    mixed = sum(
        torch.exp(scores(i) - log_total[..., None]) @ pv[None, :, i : i + chunk] for i in starts
    )
    targets = torch.cat([mixed, torch.exp(lse_prefix - log_total)[..., None]], -1)
    x = fq.double() * torch.exp(-log_total)[..., None]
    x = x.transpose(0, 1).reshape(heads, -1, x.shape[-1])  # (H, B·N, D')
    y = targets.transpose(0, 1).reshape(heads, -1, targets.shape[-1])
    gram = x.transpose(-2, -1) @ x
    lam = ridge * gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[:, None, None]
    prior = torch.cat([start[0].double(), start[1].double()[..., None]], dim=-1)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype)
    solved = torch.linalg.solve(gram + lam * eye, x.transpose(-2, -1) @ y + lam * prior)
    return solved[..., :-1].float(), solved[..., -1].float()

"""A catalogue of hand-written attention forms: each a small module, its inputs, and how many
sites attnopt must rewrite in it (0 for the forms that must NOT be rewritten)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

B, N, M, C, H, D = 2, 12, 10, 32, 4, 8
SCALE = 1.0 / math.sqrt(D)


class Attention(nn.Module):
    """Projections to BHSD q, k, v, then ``body(self, q, k, v, *extra)``, then back to (B, N, C).

    ``kv_heads`` < ``H`` gives GQA/MQA-shaped k, v; ``cross`` takes keys from a second input.
    """

    def __init__(
        self,
        body: Callable,
        kv_heads: int = H,
        buffers: dict | None = None,
        params: dict | None = None,
    ):
        super().__init__()
        self.body = body
        self.kv_heads = kv_heads
        self.q = nn.Linear(C, H * D)
        self.k = nn.Linear(C, kv_heads * D)
        self.v = nn.Linear(C, kv_heads * D)
        self.o = nn.Linear(H * D, C)
        for name, value in (buffers or {}).items():
            self.register_buffer(name, value)
        for name, value in (params or {}).items():
            setattr(self, name, value)

    def heads(self, x: torch.Tensor, proj: nn.Linear, heads: int) -> torch.Tensor:
        b, n, _ = x.shape
        return proj(x).view(b, n, heads, D).transpose(1, 2)

    def forward(self, x: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        ctx = (
            extra[0]
            if extra
            and extra[0].dim() == 3
            and extra[0].is_floating_point()
            and extra[0].shape[-1] == C
            else x
        )
        rest = extra[1:] if ctx is not x else extra
        q = self.heads(x, self.q, H)
        k = self.heads(ctx, self.k, self.kv_heads)
        v = self.heads(ctx, self.v, self.kv_heads)
        y = self.body(self, q, k, v, *rest)
        b, n = x.shape[:2]
        return self.o(y.transpose(1, 2).reshape(b, n, H * D))


@dataclass
class Form:
    name: str
    make: Callable[[], nn.Module]
    inputs: Callable[[], tuple]
    sites: int
    mask: str | None = None  # expected mask kind of every site, when checked
    other: Callable[[], tuple] | None = None  # inputs at a second shape (batch and length)
    atol: float = 1e-5  # output tolerance (fp16 forms need more)
    random: bool = False  # the original itself is random (active dropout): outputs not compared


def x_in() -> tuple:
    return (torch.randn(B, N, C),)


def _sm(s: torch.Tensor) -> torch.Tensor:
    return s.softmax(dim=-1)


def causal_additive(n: int, m: int) -> torch.Tensor:
    return torch.triu(torch.full((n, m), float("-inf")), diagonal=1)


FORMS: list[Form] = []


def form(name: str, sites: int = 1, inputs: Callable = x_in, mask: str | None = None, **kw):
    """Register ``body`` as a form named ``name``."""

    def register(body: Callable) -> Callable:
        FORMS.append(Form(name, lambda: Attention(body, **kw).eval(), inputs, sites, mask))
        return body

    return register


# -- products and scales --------------------------------------------------------------------
form("matmul_op_mul_scale", mask="none")(
    lambda m, q, k, v: _sm((q @ k.transpose(-2, -1)) * SCALE) @ v
)
form("torch_matmul_div_scale")(
    lambda m, q, k, v: torch.matmul(_sm(torch.matmul(q, k.transpose(2, 3)) / math.sqrt(D)), v)
)
form("prescaled_q")(lambda m, q, k, v: _sm((q * SCALE) @ k.transpose(-2, -1)) @ v)
form("prescaled_k")(lambda m, q, k, v: _sm(q @ (k * SCALE).transpose(-2, -1)) @ v)
form("prescaled_k_after_transpose")(lambda m, q, k, v: _sm(q @ (k.transpose(-2, -1) * SCALE)) @ v)
form("split_sqrt_scale")(
    lambda m, q, k, v: _sm((q * SCALE**0.5) @ (k * SCALE**0.5).transpose(-2, -1)) @ v
)
form("no_scale")(lambda m, q, k, v: _sm(q @ k.transpose(-2, -1)) @ v)
form("scale_on_left")(lambda m, q, k, v: _sm(SCALE * (q @ k.transpose(-2, -1))) @ v)
form("mT_transpose")(lambda m, q, k, v: _sm(q @ k.mT * SCALE) @ v)


def _bmm(m, q, k, v):
    b, h, n, d = q.shape
    q3, k3, v3 = (t.reshape(b * h, t.shape[2], d) for t in (q, k, v))
    return torch.bmm(_sm(torch.bmm(q3, k3.transpose(1, 2)) * SCALE), v3).view(b, h, n, d)


form("bmm_3d")(_bmm)
form("einsum_bhsd")(
    lambda m, q, k, v: torch.einsum(
        "bhnm,bhmd->bhnd", _sm(torch.einsum("bhnd,bhmd->bhnm", q, k) * SCALE), v
    )
)


def _einsum_bshd(m, q, k, v):
    qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))  # (B, S, H, D)
    p = _sm(torch.einsum("bnhd,bmhd->bhnm", qs, ks) * SCALE)
    return torch.einsum("bhnm,bmhd->bnhd", p, vs).transpose(1, 2)


form("einsum_bshd")(_einsum_bshd)


def _baddbmm(m, q, k, v):
    b, h, n, d = q.shape
    q3, k3, v3 = (t.reshape(b * h, t.shape[2], d) for t in (q, k, v))
    zeros = torch.zeros(b * h, n, k3.shape[1])
    scores = torch.baddbmm(zeros, q3, k3.transpose(1, 2), beta=0.0, alpha=SCALE)
    return torch.bmm(_sm(scores), v3).view(b, h, n, d)


form("baddbmm_alpha_scale")(_baddbmm)


def _baddbmm_mask(m, q, k, v, mask):
    b, h, n, d = q.shape
    q3, k3, v3 = (t.reshape(b * h, t.shape[2], d) for t in (q, k, v))
    bias = mask.expand(b, h, n, k3.shape[1]).reshape(b * h, n, k3.shape[1])
    return torch.bmm(_sm(torch.baddbmm(bias, q3, k3.transpose(1, 2), alpha=SCALE)), v3).view(
        b, h, n, d
    )


def x_and_padding() -> tuple:
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[0, -3:] = False
    additive = torch.zeros(B, 1, 1, N).masked_fill(
        ~keep[:, None, None, :], torch.finfo(torch.float32).min
    )
    return torch.randn(B, N, C), additive


form("baddbmm_additive_mask", inputs=x_and_padding, mask="additive")(_baddbmm_mask)

# -- masks ----------------------------------------------------------------------------------
form("additive_padding_mask", inputs=x_and_padding, mask="additive")(
    lambda m, q, k, v, a: _sm(q @ k.transpose(-2, -1) * SCALE + a) @ v
)
form("additive_mask_before_scale", inputs=x_and_padding, mask="additive")(
    lambda m, q, k, v, a: _sm((q @ k.transpose(-2, -1) + a) * SCALE) @ v
)
form("additive_2d_bias", mask="additive", buffers={"bias2d": torch.randn(N, N)})(
    lambda m, q, k, v: _sm(q @ k.transpose(-2, -1) * SCALE + m.bias2d) @ v
)


def x_and_bool() -> tuple:
    keep = torch.rand(B, 1, N, N) > 0.3
    keep[..., 0] = True
    return torch.randn(B, N, C), keep


form("bool_mask_masked_fill", inputs=x_and_bool, mask="boolean")(
    lambda m, q, k, v, keep: (
        _sm((q @ k.transpose(-2, -1) * SCALE).masked_fill(~keep, float("-inf"))) @ v
    )
)
form("bool_mask_where", inputs=x_and_bool, mask="boolean")(
    lambda m, q, k, v, keep: (
        _sm(torch.where(keep, q @ k.transpose(-2, -1) * SCALE, float("-inf"))) @ v
    )
)
form("bool_mask_finfo_min_fill", inputs=x_and_bool, mask="boolean")(
    lambda m, q, k, v, keep: (
        _sm(
            (q @ k.transpose(-2, -1) * SCALE).masked_fill(
                keep.logical_not(), torch.finfo(torch.float32).min
            )
        )
        @ v
    )
)
form("bool_mask_fill_before_scale", inputs=x_and_bool, mask="boolean")(
    lambda m, q, k, v, keep: _sm((q @ k.transpose(-2, -1)).masked_fill(~keep, -1e9) * SCALE) @ v
)


def _causal_triu(m, q, k, v):
    n = q.shape[-2]
    return _sm(q @ k.transpose(-2, -1) * SCALE + causal_additive(n, n)) @ v


form("causal_triu_additive", mask="causal")(_causal_triu)


def _causal_tril_fill(m, q, k, v):
    n = q.shape[-2]
    tril = torch.tril(torch.ones(n, n))
    return _sm((q @ k.transpose(-2, -1) * SCALE).masked_fill(tril == 0, float("-inf"))) @ v


form("causal_tril_eq0", mask="causal")(_causal_tril_fill)


def _causal_tril_bool(m, q, k, v):
    n = q.shape[-2]
    keep = torch.ones(n, n, dtype=torch.bool).tril()
    return _sm((q @ k.transpose(-2, -1) * SCALE).masked_fill(~keep, float("-inf"))) @ v


form("causal_tril_bool_not", mask="causal")(_causal_tril_bool)


def _causal_arange(m, q, k, v):
    n = q.shape[-2]
    pos = torch.arange(n)
    keep = pos[:, None] >= pos[None, :]
    return _sm(torch.where(keep, q @ k.transpose(-2, -1) * SCALE, float("-inf"))) @ v


form("causal_arange_compare", mask="causal")(_causal_arange)


def _causal_buffer(m, q, k, v):
    n = q.shape[-2]
    s = (q @ k.transpose(-2, -1)) * SCALE
    s = s.masked_fill(m.tri[:, :, :n, :n] == 0, float("-inf"))
    return F.softmax(s, dim=-1) @ v


form(
    "causal_buffer_slice_nanogpt",
    mask="causal",
    buffers={"tri": torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32)},
)(_causal_buffer)


def _causal_buffer_gpt2(m, q, k, v):
    n, mm = q.shape[-2], k.shape[-2]
    keep = m.tri_bool[:, :, mm - n : mm, :mm]
    s = torch.where(keep, q @ k.transpose(-2, -1) / math.sqrt(D), torch.finfo(torch.float32).min)
    return nn.functional.softmax(s, dim=-1) @ v


form(
    "causal_buffer_slice_gpt2",
    mask="causal",
    buffers={"tri_bool": torch.tril(torch.ones(32, 32, dtype=torch.bool)).view(1, 1, 32, 32)},
)(_causal_buffer_gpt2)


def _sliding_window(m, q, k, v):
    n = q.shape[-2]
    ones = torch.ones(n, n, dtype=torch.bool)
    band = torch.tril(ones) & torch.triu(ones, diagonal=-3)
    return _sm((q @ k.transpose(-2, -1) * SCALE).masked_fill(~band, float("-inf"))) @ v


form("sliding_window_band", mask="boolean")(_sliding_window)


def _alibi(m, q, k, v):
    n = q.shape[-2]
    pos = torch.arange(n)
    distance = (pos[None, :] - pos[:, None]).float()
    bias = m.slopes.view(1, H, 1, 1) * distance
    return _sm(q @ k.transpose(-2, -1) * SCALE + bias + causal_additive(n, n)) @ v


form(
    "alibi_bias_plus_causal",
    buffers={"slopes": torch.tensor([2.0 ** (-i) for i in range(1, H + 1)])},
)(_alibi)


def _relative_bias(m, q, k, v):
    n = q.shape[-2]
    pos = torch.arange(n)
    rel = (pos[None, :] - pos[:, None]).clamp(-8, 8) + 8
    bias = m.rel_emb(rel).permute(2, 0, 1).unsqueeze(0)  # (1, H, N, N), learned
    return _sm(q @ k.transpose(-2, -1) + bias) @ v


form("t5_relative_position_bias", mask="additive", params={"rel_emb": nn.Embedding(17, H)})(
    _relative_bias
)

# -- softmax spellings ---------------------------------------------------------------------
form("softmax_fp32_casts")(
    lambda m, q, k, v: (q @ k.transpose(-2, -1) * SCALE).float().softmax(-1).to(q.dtype) @ v
)
form("softmax_dtype_arg")(
    lambda m, q, k, v: (
        F.softmax(q @ k.transpose(-2, -1) * SCALE, dim=-1, dtype=torch.float32).type_as(q) @ v
    )
)
form("nn_softmax_module", params={"softmax": nn.Softmax(dim=-1)})(
    lambda m, q, k, v: m.softmax(q @ k.transpose(-2, -1) * SCALE) @ v
)


def _manual_softmax(m, q, k, v):
    s = q @ k.transpose(-2, -1) * SCALE
    e = torch.exp(s - s.max(dim=-1, keepdim=True)[0])
    return (e / e.sum(dim=-1, keepdim=True)) @ v


form("manual_stable_softmax")(_manual_softmax)


def _manual_softmax_amax(m, q, k, v):
    s = q @ k.transpose(-2, -1) * SCALE
    e = (s - s.amax(-1, keepdim=True)).exp()
    return (e / e.sum(-1, keepdim=True)) @ v


form("manual_softmax_amax")(_manual_softmax_amax)
form("dropout_module_eval", params={"drop": nn.Dropout(0.1)})(
    lambda m, q, k, v: m.drop(_sm(q @ k.transpose(-2, -1) * SCALE)) @ v
)
form("dropout_p0_functional")(
    lambda m, q, k, v: F.dropout(_sm(q @ k.transpose(-2, -1) * SCALE), p=0.0, training=True) @ v
)

# -- GQA / MQA and layouts ------------------------------------------------------------------
form("gqa_repeat_interleave", kv_heads=2)(
    lambda m, q, k, v: (
        _sm(q @ k.repeat_interleave(2, dim=1).transpose(-2, -1) * SCALE)
        @ v.repeat_interleave(2, dim=1)
    )
)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    b, hk, s, d = x.shape
    return x[:, :, None, :, :].expand(b, hk, n_rep, s, d).reshape(b, hk * n_rep, s, d)


form("gqa_repeat_kv_expand", kv_heads=2)(
    lambda m, q, k, v: _sm(q @ repeat_kv(k, 2).transpose(2, 3) * SCALE) @ repeat_kv(v, 2)
)
form("mqa_broadcast", kv_heads=1)(lambda m, q, k, v: _sm(q @ k.transpose(-2, -1) * SCALE) @ v)


def _gqa_5d(m, q, k, v):
    b, h, n, d = q.shape
    q5 = q.view(b, 2, h // 2, n, d)
    k5, v5 = k.unsqueeze(2), v.unsqueeze(2)
    return (_sm(q5 @ k5.transpose(-2, -1) * SCALE) @ v5).view(b, h, n, d)


form("gqa_5d_broadcast", kv_heads=2)(_gqa_5d)


def _bshd(m, q, k, v):
    qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))  # (B, S, H, D) as many models keep them
    return _sm(qs.transpose(1, 2) @ ks.permute(0, 2, 3, 1) * SCALE) @ vs.transpose(1, 2)


form("bshd_permuted_k")(_bshd)


def _single_head_2d(m, q, k, v):
    outs = [_sm(q[0, 0] @ k[0, 0].t() * SCALE) @ v[0, 0]]
    return outs[0].expand(q.shape)


form("single_head_2d")(_single_head_2d)

# -- whole attention modules --------------------------------------------------------------


class FusedQKV(nn.Module):
    def __init__(self, split: str):
        super().__init__()
        self.split = split
        self.qkv = nn.Linear(C, 3 * C)
        self.proj = nn.Linear(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        if self.split == "unbind":
            q, k, v = self.qkv(x).reshape(b, n, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            parts = (
                self.qkv(x).chunk(3, dim=-1)
                if self.split == "chunk"
                else self.qkv(x).split(C, dim=2)
            )
            q, k, v = (t.view(b, n, H, D).transpose(1, 2) for t in parts)
        y = _sm(q @ k.transpose(-2, -1) * SCALE) @ v
        return self.proj(y.transpose(1, 2).reshape(b, n, C))


for _split in ("unbind", "chunk", "split"):
    FORMS.append(Form(f"fused_qkv_{_split}", lambda s=_split: FusedQKV(s).eval(), x_in, 1))


def x_and_context() -> tuple:
    return torch.randn(B, N, C), torch.randn(B, M, C)


form("cross_attention", inputs=x_and_context)(
    lambda m, q, k, v: _sm(q @ k.transpose(-2, -1) * SCALE) @ v
)
form("sdpa_call")(lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v))
form("sdpa_causal", mask="causal")(
    lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
)
form("sdpa_gqa", kv_heads=2)(
    lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
)
form("sdpa_additive_mask", inputs=x_and_padding, mask="additive")(
    lambda m, q, k, v, a: F.scaled_dot_product_attention(q, k, v, attn_mask=a)
)


class MHA(nn.Module):
    def __init__(self, need_weights: bool):
        super().__init__()
        self.need_weights = need_weights
        self.mha = nn.MultiheadAttention(C, H, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=self.need_weights)[0]


FORMS.append(Form("nn_multihead_attention", lambda: MHA(False).eval(), x_in, 1))
FORMS.append(Form("nn_multihead_attention_weights_unused", lambda: MHA(True).eval(), x_in, 1))


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = Attention(lambda m, q, k, v: _sm(q @ k.transpose(-2, -1) * SCALE) @ v)
        self.b = Attention(_causal_triu)

    def forward(self, x):
        return self.b(x + self.a(x))


FORMS.append(Form("two_layers", lambda: TwoLayers().eval(), x_in, 2))

# -- guards: these must NOT be rewritten ---------------------------------------------------


class ReturnsWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Attention(lambda m, q, k, v: q)

    def forward(self, x):
        q = self.inner.heads(x, self.inner.q, H)
        k = self.inner.heads(x, self.inner.k, H)
        v = self.inner.heads(x, self.inner.v, H)
        p = _sm(q @ k.transpose(-2, -1) * SCALE)
        return p @ v, p


FORMS.append(Form("guard_returns_attention_weights", lambda: ReturnsWeights().eval(), x_in, 0))
form(
    "guard_per_head_tensor_scale",
    sites=0,
    params={"head_scale": nn.Parameter(torch.rand(H, 1, 1) + 0.5)},
)(lambda m, q, k, v: _sm(q @ k.transpose(-2, -1) * m.head_scale) @ v)
form("guard_softmax_over_query_axis", sites=0)(
    lambda m, q, k, v: q.new_zeros(q.shape) + (_sm(q @ k.transpose(-2, -1)).softmax(-2) @ v)
)


class MixedAxesKey(nn.Module):
    """K permuted across batch and sequence axes (a cube, so every shape lines up)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        q = k = v = self.proj(x)  # (D, D, D)
        return _sm(q @ k.permute(2, 1, 0) * SCALE) @ v


FORMS.append(
    Form(
        "guard_k_permutation_not_last_two",
        lambda: MixedAxesKey().eval(),
        lambda: (torch.randn(D, D, D),),
        0,
    )
)
form("guard_nonlinear_after_softmax", sites=0)(
    lambda m, q, k, v: torch.relu(_sm(q @ k.transpose(-2, -1) * SCALE) - 0.01) @ v
)
form("guard_square_of_weights", sites=0)(
    lambda m, q, k, v: (_sm(q @ k.transpose(-2, -1) * SCALE) ** 2) @ v
)


def x_and_int_mask() -> tuple:
    return torch.randn(B, N, C), torch.randint(-1, 1, (B, 1, 1, N))


form("guard_integer_additive_mask", sites=0, inputs=x_and_int_mask)(
    lambda m, q, k, v, im: _sm(q @ k.transpose(-2, -1) * SCALE + im) @ v
)


def _dropout_training():
    model = Attention(
        lambda m, q, k, v: m.drop(_sm(q @ k.transpose(-2, -1) * SCALE)) @ v,
        params={"drop": nn.Dropout(0.1)},
    )
    return model.train()


FORMS.append(Form("guard_dropout_in_training", _dropout_training, x_in, 0))


def _opt_style(m, q, k, v, mask):
    """OPT/BART eager attention: 3-D bmm, scores viewed 4-D to add the mask, then back."""
    b, h, n, d = q.shape
    mm = k.shape[2]
    q3, k3, v3 = (t.reshape(b * h, t.shape[2], d) for t in (q, k, v))
    w = torch.bmm(q3 * SCALE, k3.transpose(1, 2))
    w = w.view(b, h, n, mm) + mask
    w = w.view(b * h, n, mm)
    return torch.bmm(F.softmax(w, dim=-1), v3).view(b, h, n, d)


form("opt_style_bmm_4d_mask", inputs=x_and_padding, mask="additive")(_opt_style)


# -- round 2: the spellings real models use ------------------------------------------------
# Each form has inputs at two shapes (``sized(batch, length)``), and a guard that must NOT fuse
# sits next to each group.


def form2(
    name: str,
    sized: Callable,
    sites: int = 1,
    mask: str | None = None,
    atol: float = 1e-5,
    random: bool = False,
    make: Callable | None = None,
    **kw,
):
    """Register ``body`` (in ``Attention``, or ``make()``) checked at two input shapes."""

    def register(body: Callable) -> Callable:
        build = make or (lambda: Attention(body, **kw).eval())
        inputs, other = (lambda: sized(B, N)), (lambda: sized(B + 1, N - 4))
        FORMS.append(Form(name, build, inputs, sites, mask, other, atol, random))
        return body

    return register


def x_sized(b: int, n: int) -> tuple:
    return (torch.randn(b, n, C),)


def qkv_sized(b: int, n: int, dtype: torch.dtype = torch.float32) -> tuple:
    return tuple(torch.randn(b, H, n, D, dtype=dtype) for _ in range(3))


def qkv_half(b: int, n: int) -> tuple:
    return qkv_sized(b, n, torch.float16)


class RawQKV(nn.Module):
    """Attention over the module's own inputs q, k, v: every dim, the head dim too, is
    dynamic under capture unless something pins it."""

    def __init__(self, body: Callable):
        super().__init__()
        self.body = body

    def forward(self, q, k, v):
        return self.body(q, k, v)


def raw(name: str, sized: Callable = qkv_sized, sites: int = 1, atol: float = 1e-5):
    def register(body: Callable) -> Callable:
        return form2(name, sized, sites, atol=atol, make=lambda: RawQKV(body).eval())(body)

    return register


def _s(q, k):
    return q @ k.transpose(-2, -1)


# scales computed from shapes
raw("scale_div_sqrt_size")(lambda q, k, v: _sm(_s(q, k) / math.sqrt(q.size(-1))) @ v)
raw("scale_shape_pow")(lambda q, k, v: _sm(_s(q, k) * q.shape[-1] ** -0.5) @ v)
raw("scale_div_full_0d")(
    lambda q, k, v: _sm(torch.div(_s(q, k), torch.full([], math.sqrt(q.size(-1))))) @ v
)
form2(
    "guard_div_by_per_head_tensor",
    x_sized,
    sites=0,
    params={"temperature": nn.Parameter(torch.rand(H, 1, 1) + 0.5)},
)(lambda m, q, k, v: _sm(_s(q, k) / m.temperature) @ v)

# softmax spellings, casts, dropout that is the identity
raw("softmax_safe_softmax")(lambda q, k, v: torch.ops.aten._safe_softmax(_s(q, k) * SCALE, -1) @ v)
raw("softmax_log_softmax_exp")(lambda q, k, v: F.log_softmax(_s(q, k) * SCALE, -1).exp() @ v)
raw("softmax_fp32_then_to_half", qkv_half, atol=2e-3)(
    lambda q, k, v: (_s(q, k) * SCALE).float().softmax(-1).to(torch.half) @ v
)
raw("softmax_fp32_then_type_v_dtype", qkv_half, atol=2e-3)(
    lambda q, k, v: F.softmax(_s(q, k).float() * SCALE, dim=-1).type(v.dtype) @ v
)
raw("softmax_fp32_then_type_as_q", qkv_half, atol=2e-3)(
    lambda q, k, v: _sm((_s(q, k) * SCALE).float()).type_as(q) @ v
)
raw("v_cast_to_probs_dtype", qkv_half, atol=2e-3)(
    lambda q, k, v: (lambda p: (p @ v.to(p.dtype)).half())(_sm(_s(q, k).float() * SCALE))
)
raw("dropout_p0_default_training")(lambda q, k, v: F.dropout(_sm(_s(q, k) * SCALE), 0.0) @ v)
raw("torch_dropout_p0_train_true")(
    lambda q, k, v: torch.dropout(_sm(_s(q, k) * SCALE), 0.0, True) @ v
)
raw("guard_log_softmax_without_exp", sites=0)(
    lambda q, k, v: F.log_softmax(_s(q, k) * SCALE, -1) @ v
)
form2("guard_functional_dropout_training", x_sized, sites=0, random=True)(
    lambda m, q, k, v: F.dropout(_sm(_s(q, k) * SCALE), 0.1, training=True) @ v
)


# masks
def x_and_keep_long(b: int, n: int) -> tuple:
    keep = torch.ones(b, n, dtype=torch.long)
    keep[0, -3:] = 0
    return torch.randn(b, n, C), keep


def _expand_as_mask(m, q, k, v, keep):
    s = _s(q, k) * SCALE
    dropped = (keep == 0).view(q.shape[0], 1, 1, k.shape[-2]).expand_as(s)
    return _sm(s.masked_fill(dropped, float("-inf"))) @ v


form2("mask_eq0_view_expand_as", x_and_keep_long, mask="boolean")(_expand_as_mask)


def x_and_additive(b: int, n: int, dtype: torch.dtype = torch.float32) -> tuple:
    additive = torch.zeros(b, 1, 1, n, dtype=dtype)
    additive[0, ..., -3:] = torch.finfo(dtype).min
    return torch.randn(b, n, C), additive


def _where_causal_plus_additive(m, q, k, v, a):
    n = q.shape[-2]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    floor = torch.full((), torch.finfo(torch.float32).min)
    return _sm(torch.where(causal, _s(q, k) * SCALE, floor) + a) @ v


form2("mask_where_causal_finfo_plus_additive", x_and_additive, mask="causal+additive")(
    _where_causal_plus_additive
)


def _where_causal_tensor_fill_plus_additive(m, q, k, v, a):
    """GPT-Neo: the fill value is a tensor built in forward (a lifted constant once exported)."""
    n = q.shape[-2]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    floor = torch.tensor(torch.finfo(torch.float32).min, dtype=torch.float32)
    return _sm(torch.where(causal, _s(q, k) * SCALE, floor) + a) @ v


form2("mask_where_causal_tensor_fill_plus_additive", x_and_additive, mask="causal+additive")(
    _where_causal_tensor_fill_plus_additive
)


def x_and_keep_bool(b: int, n: int) -> tuple:
    keep = torch.rand(b, 1, n, n) > 0.3
    keep[..., 0] = True
    return torch.randn(b, n, C), keep


def _masked_fill_inplace(m, q, k, v, keep):
    s = _s(q, k) * SCALE
    s.masked_fill_(~keep, float("-inf"))
    return _sm(s) @ v


form2("mask_masked_fill_inplace", x_and_keep_bool, mask="boolean")(_masked_fill_inplace)
form2(
    "mask_half_additive_on_fp32_scores",
    lambda b, n: x_and_additive(b, n, torch.float16),
    mask="additive",
)(lambda m, q, k, v, a: _sm(_s(q, k) * SCALE + a) @ v)

WINDOWS = 2


def _swin(m, q, k, v):
    """Swin: a shifted-window mask (windows, N, N) added through a 5-D view of the scores."""
    b, h, n, _ = q.shape
    s = _s(q, k) * SCALE + m.rel_bias
    s = s.view(b // WINDOWS, WINDOWS, h, n, n) + m.window_mask.unsqueeze(1).unsqueeze(0)
    return _sm(s.view(-1, h, n, n)) @ v


form2(
    "swin_shifted_window_5d_view",
    lambda b, n: (torch.randn(2 * b, N, C),),
    mask="additive",
    buffers={
        "window_mask": torch.where(torch.rand(WINDOWS, N, N) > 0.3, 0.0, -100.0),
        "rel_bias": torch.randn(1, H, N, N),
    },
)(_swin)


def _inplace_then_reused(m, q, k, v, keep):
    s = _s(q, k) * SCALE
    s.masked_fill_(~keep, float("-inf"))
    return _sm(s) @ v + s.amax(-1, keepdim=True)


form2("guard_masked_scores_reused", x_and_keep_bool, sites=0)(_inplace_then_reused)


# products and layouts
def _to3(*ts):
    return tuple(t.reshape(-1, t.shape[-2], t.shape[-1]) for t in ts)


def _baddbmm_empty(m, q, k, v):
    b, h, n, d = q.shape
    q3, k3, v3 = _to3(q, k, v)
    empty = torch.empty(b * h, n, k3.shape[1], dtype=q.dtype)
    scores = torch.baddbmm(empty, q3, k3.transpose(1, 2), beta=0, alpha=SCALE)
    return torch.bmm(_sm(scores), v3).view(b, h, n, d)


form2("baddbmm_empty_beta0", x_sized)(_baddbmm_empty)


def _bmm_views_scale_inside(m, q, k, v, a):
    b, h, n, d = q.shape
    q3, k3, v3 = _to3(q, k, v)
    w = torch.bmm(q3, k3.transpose(1, 2)).view(b, h, n, k.shape[2])
    w = (w * SCALE + a).view(b * h, n, k.shape[2])
    return torch.bmm(w.softmax(-1), v3).view(b, h, n, d)


form2("bmm_3d_viewed_4d_scale_and_mask", x_and_additive, mask="additive")(_bmm_views_scale_inside)


def _einsum_detached_max(m, q, k, v):
    s = torch.einsum("bhnd,bhmd->bhnm", q, k) * SCALE
    s = s - s.amax(-1, keepdim=True).detach()
    return torch.einsum("bhnm,bhmd->bhnd", s.softmax(-1), v)


form2("einsum_minus_detached_row_max", x_sized)(_einsum_detached_max)


def _minus_column_max(m, q, k, v):
    s = _s(q, k) * SCALE
    return (s - s.amax(-2, keepdim=True)).softmax(-1) @ v


form2("guard_minus_column_max", x_sized, sites=0)(_minus_column_max)


class KeyPreTransposed(nn.Module):
    """K comes out of its projection already as (b, h, d, L): no transpose before Q·Kᵀ."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(C, H * D) for _ in range(3))

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, H, D).transpose(1, 2)
        kt = self.k(x).view(b, n, H, D).permute(0, 2, 3, 1)
        v = self.v(x).view(b, n, H, D).transpose(1, 2)
        return (_sm(q @ kt * SCALE) @ v).transpose(1, 2).reshape(b, n, H * D)


form2("k_projected_pre_transposed", x_sized, make=lambda: KeyPreTransposed().eval())(None)
SLOPES = torch.tensor([2.0 ** (-i) for i in range(1, H + 1)])


def _alibi_bias(m, n):
    return m.slopes.view(1, H, 1, 1) * torch.arange(n).float()[None, :]


form2("mqa_alibi_before_scale", x_sized, kv_heads=1, buffers={"slopes": SLOPES})(
    lambda m, q, k, v: _sm((_s(q, k) + _alibi_bias(m, q.shape[-2])) * SCALE) @ v
)
form2("mqa_alibi_after_scale", x_sized, kv_heads=1, buffers={"slopes": SLOPES})(
    lambda m, q, k, v: _sm(_s(q, k) * SCALE + _alibi_bias(m, q.shape[-2])) @ v
)
form2("guard_mqa_scale_per_head_tensor", x_sized, sites=0, kv_heads=1, buffers={"hs": SLOPES})(
    lambda m, q, k, v: _sm(_s(q, k) * m.hs.view(1, H, 1, 1)) @ v
)


def _probs_viewed_back(m, q, k, v, a):
    """Bloom/Falcon: (b·h) scores viewed 4-D for the mask and the softmax, the probabilities
    viewed back to 3-D for the bmm with V."""
    b, h, n, d = q.shape
    q3, k3, v3 = _to3(q, k, v)
    kt = k3.transpose(1, 2).contiguous()  # K arrives already as (b·h, d, m)
    w = torch.baddbmm(m.alibi.expand(b * h, 1, k.shape[2]), q3, kt, beta=1.0, alpha=SCALE)
    p = F.softmax(w.view(b, h, n, -1) + a, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.bmm(p.view(b * h, n, -1), v3).view(b, h, n, d)


form2(
    "bmm_probs_viewed_back_after_softmax",
    x_and_additive,
    mask="additive",
    buffers={"alibi": torch.randn(1, 1, 1)},
)(_probs_viewed_back)


def _flat_alibi(m, b: int, n: int) -> torch.Tensor:
    """ALiBi per (batch·head) and key, (b·h, 1, m), as Bloom builds it."""
    return _alibi_bias(m, n).expand(b, H, 1, n).reshape(b * H, 1, n)


def _4d_viewed_3d_for_mask(m, q, k, v):
    """The other order around the mask: 4-D scores viewed (b·h, n, m) to add a per-(b·h) bias,
    then back to 4-D for the softmax."""
    b, h, n, d = q.shape
    w = (_s(q, k) * SCALE).view(b * h, n, -1) + _flat_alibi(m, b, k.shape[2])
    return _sm(w.view(b, h, n, -1)) @ v


form2("scores_4d_viewed_3d_for_mask", x_sized, mask="additive", buffers={"slopes": SLOPES})(
    _4d_viewed_3d_for_mask
)


def _4d_softmax_3d(m, q, k, v):
    """4-D scores viewed (b·h, n, m) for the mask and the softmax; the probabilities viewed back
    to 4-D for the product with 4-D V."""
    b, h, n, d = q.shape
    p = _sm((_s(q, k) * SCALE).view(b * h, n, -1) + _flat_alibi(m, b, k.shape[2]))
    return p.view(b, h, n, -1) @ v


form2("scores_4d_softmax_in_3d_viewed_back", x_sized, mask="additive", buffers={"slopes": SLOPES})(
    _4d_softmax_3d
)


def _3d_scores_4d_product(m, q, k, v, a):
    """(b·h) scores viewed 4-D for the mask and the softmax, and the product taken in 4-D
    with V as it is: no view back."""
    b, h, n, d = q.shape
    q3, k3 = _to3(q, k)
    w = torch.bmm(q3, k3.transpose(1, 2)).view(b, h, n, -1) * SCALE + a
    return _sm(w) @ v


form2("bmm_3d_scores_4d_softmax_and_product", x_and_additive, mask="additive")(
    _3d_scores_4d_product
)


def _heads_regrouped(m, q, k, v, a):
    """Q merged head-major to (h·b, n, d) but the scores viewed batch-major (b, h, n, m): each
    query row meets another batch's keys' rows, which no attention op computes."""
    b, h, n, d = q.shape
    q3 = q.transpose(0, 1).reshape(h * b, n, d)
    (k3,) = _to3(k)
    w = torch.bmm(q3, k3.transpose(1, 2)).view(b, h, n, -1) * SCALE + a
    return _sm(w) @ v


form2("guard_heads_regrouped_across_view", x_and_additive, sites=0)(_heads_regrouped)


def _heads_into_queries(m, q, k, v):
    b, h, n, d = q.shape
    p = _sm(_s(q, k) * SCALE).reshape(b, h * n, -1)  # heads folded into the query axis
    return (p @ v.reshape(b, h * n, d)[:, : k.shape[2]]).view(b, h, n, d)


form2("guard_probs_viewed_across_heads", x_sized, sites=0)(_heads_into_queries)

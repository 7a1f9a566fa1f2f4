"""Finding a site's projections in the graph (rewriter/projections.py): through a rotary
embedding and a matmul by a weight, and the reasons when they are not there."""

import torch
import torch.nn.functional as F
from torch import nn

import attnopt
from attnopt.api import _detect
from attnopt.codegen.eager.int8_linear import Int8Linear
from attnopt.frontends.export.capture import Inputs
from attnopt.rewriter.projections import Projections, find_projections

B, N, C, H, D = 2, 12, 32, 4, 8


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = t[..., : D // 2], t[..., D // 2 :]
    return t * cos + torch.cat((-second, first), dim=-1) * sin


class Rotary(nn.Module):
    """Separate q/k projections with a rotary embedding, V as ``x @ W`` (a weight parameter),
    and ``sink`` (when set) reading the attention output besides the output projection."""

    def __init__(self, sink: bool = False) -> None:
        super().__init__()
        self.q, self.k, self.o = nn.Linear(C, C), nn.Linear(C, C, bias=False), nn.Linear(C, C)
        self.w_v = nn.Parameter(torch.randn(C, C) / C**0.5)
        angles = torch.arange(N)[:, None] * 0.3 ** torch.arange(D)[None, :]
        self.register_buffer("cos", angles.cos())
        self.register_buffer("sin", angles.sin())
        self.sink = sink

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        cos, sin = self.cos[:n], self.sin[:n]
        q, k = (p(x).view(b, n, H, D).transpose(1, 2) for p in (self.q, self.k))
        v = (x @ self.w_v).view(b, n, H, D).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        y = F.softmax(q @ k.transpose(-2, -1) / D**0.5, dim=-1) @ v
        y = y.transpose(1, 2).reshape(b, n, C)
        return self.o(y) + (y if self.sink else 0)


def _found(model: nn.Module) -> Projections | str:
    _, view, found = _detect(model, Inputs.of((torch.randn(B, N, C),)))
    (site,) = found.sites
    return find_projections(view, site)


def test_projections_through_rotary_and_matmul_by_a_weight():
    model = Rotary().eval()
    found = _found(model)
    assert isinstance(found, Projections) and found.no_output is None
    weights = {name: p.weight for name, p in found.inputs.items()}
    assert weights["q"] is model.q.weight and weights["k"] is model.k.weight
    torch.testing.assert_close(weights["v"], model.w_v.t())
    assert found.inputs["q"].bias is model.q.bias and found.inputs["k"].bias is None
    assert found.output.weight is model.o.weight
    x = torch.randn(B, N, C)
    opt = attnopt.optimize(
        model, (x,), variants=("quant",), tolerance={"cos": 0.0},
        knobs={"quant": {"quant_projections": True}},
    )  # fmt: skip
    assert sum(isinstance(m, Int8Linear) for m in opt.modules()) == 4
    with torch.no_grad():
        got, want = opt(x), model(x)
    assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999


def test_output_read_besides_the_projection_keeps_it():
    found = _found(Rotary(sink=True).eval())
    assert isinstance(found, Projections) and found.output is None
    assert found.no_output == "the attention output has 2 readers, not one linear layer"

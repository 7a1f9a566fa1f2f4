"""``attnopt.prefix_ntk``: trainable ``Z, z`` at chosen sites, every base weight frozen."""

import pytest
import torch
import torch.nn.functional as F

import attnopt
from attnopt.errors import AttnoptError
from tests.fixtures.tiny_lm import HELD_OUT_FILES, batches, load, text_bytes
from tests.prefix_forms import PrefixAttention, inputs


@pytest.fixture(scope="module")
def data():
    return batches(text_bytes(HELD_OUT_FILES), 2, 33, 2, seed=3)


def _loss(model, batch):
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))


def test_trains_only_z_and_starts_where_the_model_was(data):
    model = load()
    tuned = attnopt.prefix_ntk(model, (data[0][:, :-1],), feature_dim=16)
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert trainable == {f"graph_module.attnopt_site_{i}.{w}" for i in (0, 1) for w in "Zz"}
    assert tuned.attnopt_report.sites[0].config == "feature_dim=16, prefix_len=0"
    with torch.no_grad():
        torch.testing.assert_close(tuned(data[1][:, :-1]), model(data[1][:, :-1]))
    base = {n: p.detach().clone() for n, p in tuned.named_parameters() if not p.requires_grad}
    opt = torch.optim.Adam([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = _loss(tuned, data[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.01
    for name, p in tuned.named_parameters():
        if name in base:
            assert torch.equal(p, base[name]), name


def test_chosen_sites_and_bad_choices(data):
    tuned = attnopt.prefix_ntk(load(), (data[0][:, :-1],), sites=[1])
    assert [s.status for s in tuned.attnopt_report.sites] == ["skipped", "rewritten"]
    with pytest.raises(AttnoptError, match="unknown site"):
        attnopt.prefix_ntk(load(), (data[0][:, :-1],), sites=[7])


def test_an_existing_prefix_is_replaced():
    model = PrefixAttention(prefix=32).eval()
    tuned = attnopt.prefix_ntk(model, inputs(2, 16))
    (site,) = tuned.attnopt_report.sites
    assert site.config == "feature_dim=0, prefix_len=32"
    x = inputs(2, 16, seed=5)
    with torch.no_grad():
        out, ref = tuned(*x), model(*x)
    assert 0 < float((out - ref).abs().mean() / ref.abs().mean()) < 0.5

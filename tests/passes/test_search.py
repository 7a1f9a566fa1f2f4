"""search=True: an Optuna study over variants and knobs; the front is feasible, the kept plan
fits the budget, and ``attnopt report --plot`` draws the front."""

import json

import torch
from typer.testing import CliRunner

import attnopt
from attnopt.cli import app
from tests.fixtures.tiny_lm import TinyLM

BUDGET = {"rel_l1": 0.6, "cos": 0.8}


def test_search_front_and_plot(tmp_path):
    torch.manual_seed(0)
    model = TinyLM().eval()
    gen = torch.Generator().manual_seed(3)
    cal = [(torch.randint(0, 256, (2, 32), generator=gen),) for _ in range(2)]
    opt = attnopt.optimize(
        model,
        cal[0],
        variants=("linear", "exact"),
        tolerance=BUDGET,
        calibration=cal,
        search=True,
        search_trials=6,
        knobs={"linear": {"chunk": 16}},  # fixed: out of the search space
    )
    report = opt.attnopt_report
    assert report.pareto
    times = [p["ms"] for p in report.pareto]
    assert times == sorted(times)
    errors = [p["model_rel_l1"] for p in report.pareto]
    assert errors == sorted(errors, reverse=True)  # a front: each faster plan is less accurate
    assert report.model_metrics["rel_l1"] <= BUDGET["rel_l1"]
    tried = [entry for point in report.pareto for entry in point["plan"] if ": linear " in entry]
    assert all("'chunk': 16" in entry for entry in tried)
    for site in report.sites:
        kept = site.trials[-1]
        assert kept.decision.startswith("kept (search")
        if kept.variant == "linear":
            assert kept.metrics["rel_l1"] <= BUDGET["rel_l1"]
            assert set(kept.knobs) == {"feature_map", "feature_dim", "chunk"}
            assert kept.knobs["chunk"] == 16
    saved = tmp_path / "report.json"
    saved.write_text(report.to_json())
    image = tmp_path / "front.png"
    result = CliRunner().invoke(app, ["report", str(saved), "--plot", str(image)])
    assert result.exit_code == 0, result.output
    assert image.stat().st_size > 1000 and json.loads(saved.read_text())["pareto"]


def test_report_plot_without_front_is_a_clear_error(tmp_path):
    saved = tmp_path / "report.json"
    saved.write_text(json.dumps({"model": "m", "sites": [], "pareto": []}))
    result = CliRunner().invoke(app, ["report", str(saved), "--plot", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "no Pareto front" in result.output

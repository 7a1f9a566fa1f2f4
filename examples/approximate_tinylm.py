"""Approximate attention under an error budget, on the trained quality fixture (a byte-level LM
trained on Python's standard library): the budget picks each site's variant, ``calibrate``
trains the new feature maps, a search gives the time/error front. Runs on CPU in under a minute.

    python examples/approximate_tinylm.py
    attnopt report /tmp/approximate_tinylm.json --plot /tmp/front.png   # afterwards
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the fixture lives under tests/
import attnopt  # noqa: E402
from tests.fixtures import tiny_lm  # noqa: E402


def main() -> None:
    model = tiny_lm.load()
    train = tiny_lm.text_bytes(tiny_lm.TRAIN_FILES)
    held = tiny_lm.text_bytes(tiny_lm.HELD_OUT_FILES)
    calibration = [(b,) for b in tiny_lm.batches(train, 3, 128, 2, seed=7)]
    print(f"exact perplexity on held-out text: {tiny_lm.perplexity(model, held):.3f}")

    # 1. The budget: each site takes the first allowed variant whose measured error on the
    #    calibration batches fits, and the logits must stay within model_rel_l1 as a whole.
    fast = attnopt.optimize(
        model,
        calibration[0],
        variants=("hybrid", "linear", "exact"),
        tolerance={"rel_l1": 0.5, "cos": 0.8, "model_rel_l1": 0.3},
        calibration=calibration,
        knobs={"hybrid": {"window": 32, "feature_map": "hedgehog"}},  # fixed, not searched
    )
    fast.attnopt_report.print()
    print(f"perplexity with the chosen plan: {tiny_lm.perplexity(fast, held):.3f}")

    # 2. Attention transfer: train only the sites' feature maps and mixing weights.
    losses = attnopt.calibrate(fast, calibration, steps=20)
    if losses:
        print(f"transfer loss {losses[0]:.3e} -> {losses[-1]:.3e}")
        print(f"perplexity after calibration: {tiny_lm.perplexity(fast, held):.3f}")

    # 3. Search: an Optuna study over variants and knobs per site, for time and model error.
    searched = attnopt.optimize(
        model,
        calibration[0],
        variants=("linear", "hybrid", "exact"),
        tolerance={"rel_l1": 0.5, "cos": 0.8, "model_rel_l1": 0.3},
        calibration=calibration[:1],
        search=True,
        search_trials=5,
    )
    report = searched.attnopt_report
    for point in report.pareto:
        print(f"front: {point['ms']:.2f} ms, model rel_l1 {point['model_rel_l1']:.3f}")
    saved = Path("/tmp/approximate_tinylm.json")
    saved.write_text(report.to_json())
    print(f"wrote {saved}; draw its front with: attnopt report {saved} --plot front.png")


if __name__ == "__main__":
    main()

"""Train the quality fixture (tests/fixtures/tiny_lm.py) and save its weights beside it.

    python benchmarks/train_quality_fixture.py [--steps 400] [--batch 16] [--alibi]

Byte-level LM on a few standard-library modules; a few minutes on two CPU cores. Prints the
held-out perplexity (fractions.py, never trained on).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the fixture lives under tests/
from tests.fixtures.tiny_lm import (  # noqa: E402
    ALIBI_WEIGHTS,
    HELD_OUT_FILES,
    TRAIN_FILES,
    WEIGHTS,
    TinyLM,
    batches,
    load,
    perplexity,
    text_bytes,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--alibi", action="store_true", help="ALiBi biases (tiny_lm_alibi.pt)")
    args = parser.parse_args()
    path = ALIBI_WEIGHTS if args.alibi else WEIGHTS
    torch.manual_seed(0)
    train, held = text_bytes(TRAIN_FILES), text_bytes(HELD_OUT_FILES)
    model = TinyLM(alibi=args.alibi)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.01
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.steps)
    start = time.perf_counter()
    for step, window in enumerate(batches(train, args.steps, args.length + 1, args.batch, seed=0)):
        logits = model(window[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), window[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            elapsed = time.perf_counter() - start
            print(f"step {step} loss {loss.item():.3f} ({elapsed:.0f}s)", flush=True)
    model.eval()
    torch.save({name: value.half() for name, value in model.state_dict().items()}, path)
    model = load(args.alibi)  # what the tests see: the fp16-stored weights
    print(f"held-out perplexity {perplexity(model, held):.3f}")
    print(f"saved {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()

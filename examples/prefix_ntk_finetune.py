"""Parameter-efficient fine-tuning with NTK-attention prefixes: the quality fixture (a byte-level
LM trained on a few stdlib modules) adapted to another module's source by training only each
attention site's ``Z, z`` (``attnopt.prefix_ntk``); every base weight stays frozen.

Prints the trainable parameter count and the held-out perplexity on the new source before and
after. Runs in well under a minute on a CPU: ``python examples/prefix_ntk_finetune.py``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import attnopt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the fixture lives under tests/
from tests.fixtures.tiny_lm import batches, load, perplexity, text_bytes  # noqa: E402

DOMAIN = ("fractions.py", "statistics.py")  # sources the fixture never saw
STEPS, LENGTH, BATCH = 50, 64, 8


def main() -> None:
    torch.manual_seed(0)
    data = text_bytes(DOMAIN)
    cut = int(0.9 * len(data))
    train, held = data[:cut], data[cut:]
    model = load()
    tuned = attnopt.prefix_ntk(model, (train[None, :LENGTH],), feature_dim=32)
    trainable = [p for p in tuned.parameters() if p.requires_grad]
    frozen = sum(p.numel() for p in tuned.parameters() if not p.requires_grad)
    print(f"trainable {sum(p.numel() for p in trainable)} parameters (Z, z), frozen {frozen}")
    print(f"held-out perplexity before: {perplexity(tuned, held):.3f}")
    opt = torch.optim.Adam(trainable, lr=2e-3)
    start = time.perf_counter()
    for step, batch in enumerate(batches(train, STEPS, LENGTH + 1, BATCH, seed=1)):
        logits = tuned(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == STEPS - 1:
            print(f"step {step:3d}  train loss {loss.item():.3f}")
    print(f"held-out perplexity after:  {perplexity(tuned, held):.3f}")
    print(f"{STEPS} steps in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()

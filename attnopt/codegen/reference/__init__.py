"""Plain-torch references, one module per variant: the oracles and CPU fallbacks."""

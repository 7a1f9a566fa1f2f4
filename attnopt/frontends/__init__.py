"""Front ends: each turns one kind of model into graphs the shared core (GraphView, canonicalize,
detect, site) reads, and splices the rewritten sites back."""

"""The shared core every front end feeds: the GraphView, canonicalization, detection and the
canonical attention site."""

"""Front ends, the GraphView every detector reads, canonicalization and detection."""

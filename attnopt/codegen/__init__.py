"""Kernels per variant and backend. Codegen never sees a graph: only tensors, flags and a config."""

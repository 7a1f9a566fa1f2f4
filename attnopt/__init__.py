"""attnopt: find attention in a model and rewrite it into fused kernels."""

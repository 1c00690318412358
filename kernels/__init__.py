"""Kernels for darl_infer; each op sits beside its PyTorch reference with the same signature."""

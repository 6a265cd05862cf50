"""Triton kernels of opir, each beside its PyTorch reference (installed as `opir_kernels`)."""

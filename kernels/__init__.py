"""Triton kernels of adopt_triton, installed as ``adopt_triton.kernels``."""

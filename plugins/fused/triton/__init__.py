"""Triton kernels of the fused backend, one module per op (imported only where triton is installed)."""

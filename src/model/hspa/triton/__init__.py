"""Exact HSPA as fused Triton kernels (CUDA; the CPU under TRITON_INTERPRET=1): launch.py launches kernels.py."""

from model.hspa.triton.launch import available, hspa_triton

__all__ = ['available', 'hspa_triton']

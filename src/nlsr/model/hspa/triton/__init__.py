"""Exact HSPA as fused Triton kernels (CUDA; the CPU under TRITON_INTERPRET=1): launch.py launches kernels.py."""

from nlsr.model.hspa.triton.launch import (
    MISSING,
    SHARED_PER_BLOCK,
    Tiles,
    available,
    choose_tiles,
    hspa_triton,
    supports,
    traced_as_constant,
    unsupported_reason,
)

__all__ = ['MISSING', 'SHARED_PER_BLOCK', 'Tiles', 'available', 'choose_tiles', 'hspa_triton', 'supports',
           'traced_as_constant', 'unsupported_reason']

"""The native CPU kernels of the blocked HSPA: hspa_kernel.c, compiled once per machine and loaded by ctypes."""

from model.hspa.native.loader import describe, function, load, ptr, unavailable_reason

__all__ = ['describe', 'function', 'load', 'ptr', 'unavailable_reason']

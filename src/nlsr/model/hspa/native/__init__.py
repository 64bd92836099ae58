"""The native CPU kernels of the blocked HSPA: hspa_kernel.c, compiled once per machine and loaded by ctypes."""

from nlsr.model.hspa.native.loader import (
                                      TILE_ROWS,
                                      AttendArgs,
                                      GradKeysArgs,
                                      GradRowsArgs,
                                      Tiles,
                                      cache_sizes,
                                      choose_tiles,
                                      column_tile,
                                      describe,
                                      function,
                                      load,
                                      ptr,
                                      screens,
                                      tiles_for,
                                      torch_uses_libgomp,
                                      unavailable_reason,
)

__all__ = ['TILE_ROWS', 'AttendArgs', 'GradKeysArgs', 'GradRowsArgs', 'Tiles', 'cache_sizes', 'choose_tiles',
           'column_tile', 'describe', 'function', 'load', 'ptr', 'screens', 'tiles_for', 'torch_uses_libgomp',
           'unavailable_reason']

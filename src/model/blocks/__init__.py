"""Building blocks of MSNLAN: cross-scale attention (the convolutions and residual blocks every network uses
are model/common.py)."""

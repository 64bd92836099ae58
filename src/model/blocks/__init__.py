"""Attention blocks of the non-local networks: patch-wise cross-scale attention (MSNLAN) and pyramid
attention (PA-EDSR), both over tiles of query positions (the convolutions and residual blocks every network
uses are model/common.py)."""

"""Kernels: Triton ops with their launchers and autograd, and the pure-PyTorch backend.

Submodules are imported on first use (``attnkit.kernels.flash`` imports triton), so that
``import attnkit`` stays light.
"""

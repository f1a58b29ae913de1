"""Fused activations: SwiGLU (``silu(gate) * up``) forward and backward in one pass each.

Files: ``swiglu.py`` (entry points and the PyTorch references), ``swiglu_triton.py`` (the
Triton kernels).
"""
from .swiglu import silu_mul, silu_mul_ref, swiglu, swiglu_bwd, swiglu_fwd, swiglu_ref

__all__ = ["silu_mul", "silu_mul_ref", "swiglu", "swiglu_bwd", "swiglu_fwd", "swiglu_ref"]

"""Launching a compiled Triton kernel again without Triton's per-call Python work.

``kernel[grid](*args, **constexprs)`` re-derives the kernel's specialization from every argument
on every call (type, 16-byte alignment of each pointer, divisibility of each integer), builds a
string key from it and looks the compiled kernel up. For our kernels of 40-60 arguments that
costs about 37 us of host time per launch on the H100 machine's CPU, against 8 us for the
compiled kernel's own launcher (measured with triton 3.6). The Mamba block launches
four such kernels per forward+backward, and a lone call waits on the host.

``launch(kernel, grid, args, constexprs, **options)`` keys a cache on what decides the
specialization, exactly or more finely: every integer argument's value, every tensor's dtype and
whether its data pointer is 16-byte aligned, the constexpr values, the options and the device.
A miss launches through ``kernel[grid]`` (compiling if needed) and keeps the returned compiled
kernel; a hit calls its launcher directly. Anything unexpected on the direct path (a Triton whose
compiled kernels lack this launcher) turns the direct path off for the process, and every launch
goes through ``kernel[grid]`` as before. ``HYBRIDSEQ_TRITON_DIRECT_LAUNCH=0`` turns it off too;
under the interpreter (TRITON_INTERPRET=1) it is never used.

Arguments must be tensors, ints, floats or bools (a None argument is a constexpr in Triton: pass
a dummy tensor instead, as the kernels here do).
"""
from __future__ import annotations

import os

import torch

from .backend import interpreting

_ENV = "HYBRIDSEQ_TRITON_DIRECT_LAUNCH"
_MAX_ENTRIES = 512  # per kernel; the cache is cleared when it grows past this (many shapes)
_state = {"direct": None}  # None: not decided yet; True / False
_caches: dict = {}  # kernel -> {key: (compiled kernel, constexpr values in signature order)}


def direct_enabled() -> bool:
    if _state["direct"] is None:
        _state["direct"] = os.environ.get(_ENV, "1") != "0" and not interpreting()
    return _state["direct"]


def _key(args, constexprs, options):
    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append((a.dtype, a.data_ptr() & 15 == 0))
        elif isinstance(a, bool):  # before int: bool is an int
            parts.append(("b", a))
        elif isinstance(a, int):
            parts.append(a)
        elif isinstance(a, float):
            parts.append(("f",))
        else:
            raise TypeError(f"fast launch: unsupported argument type {type(a).__name__}")
    return (tuple(parts), tuple(constexprs.items()), tuple(options.items()),
            torch.cuda.current_device())


def _constexpr_order(kernel, constexprs):
    """The constexpr values in the kernel's signature order (the launcher takes every parameter,
    constexprs included, in that order)."""
    names = [p.name for p in kernel.params if p.is_constexpr]
    missing = [n for n in names if n not in constexprs]
    if missing:
        raise TypeError(f"fast launch: constexprs {missing} not given")
    return [constexprs[n] for n in names]


def launch(kernel, grid, args, constexprs, **options):
    """``kernel[grid](*args, **constexprs, **options)``, the compiled kernel reused directly when
    this exact specialization ran before (module docstring). ``args``: the kernel's leading
    non-constexpr parameters in order; ``constexprs``: every constexpr parameter by name;
    ``options``: num_warps, num_stages, maxnreg..."""
    if not direct_enabled():
        kernel[grid](*args, **constexprs, **options)
        return
    cache = _caches.setdefault(kernel, {})
    key = _key(args, constexprs, options)
    hit = cache.get(key)
    if hit is not None:
        ck, tail = hit
        try:
            from triton import knobs
            from triton.runtime.driver import driver

            stream = driver.active.get_current_stream(key[-1])
            g = tuple(grid) + (1, 1)
            # Triton's launch hooks (profilers such as proton set them) and their metadata
            enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
            meta = ck.launch_metadata(grid, stream, *args, *tail) if enter is not None else None
            ck.run(g[0], g[1], g[2], stream, ck.function, ck.packed_metadata, meta, enter, leave,
                   *args, *tail)
            return
        except (AttributeError, TypeError):  # this Triton's compiled kernels differ: stop
            _state["direct"] = False
            _caches.clear()
            kernel[grid](*args, **constexprs, **options)
            return
    ck = kernel[grid](*args, **constexprs, **options)
    if ck is None or not hasattr(ck, "packed_metadata"):
        return
    if len(cache) >= _MAX_ENTRIES:
        cache.clear()
    cache[key] = (ck, _constexpr_order(kernel, constexprs))


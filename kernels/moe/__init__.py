"""Mixture-of-experts ops: routing, permutation by expert, the grouped expert MLP.

- ``router_logits.py`` (+ ``router_logits_triton.py``): fp32 router logits of bf16 tokens, exact.
- ``router_topk.py`` (+ ``router_topk_triton.py``): softmax, top-k, logsumexp and the routing
  sums of the load-balancing loss in one op.
- ``permute.py`` (+ ``permute_triton.py``, ``sort_triton.py``): sort token-slots by expert, gather
  them, and the weighted un-permute.
- ``grouped_gemm.py``, ``grouped_mlp.py``: the experts' GEMMs over groups of rows.

Each op has its plain-PyTorch reference beside it (``*_ref``); ``impl`` is resolved by
``kernels.backend.resolve``.
"""

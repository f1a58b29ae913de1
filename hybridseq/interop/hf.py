"""Hugging Face transformers checkpoints <-> hybridseq models.

    model, cfg = hs.from_hf("path/to/hf_folder")       # config.json + safetensors, no network
    hs.to_hf(model, "path/to/out")                       # config.json + model.safetensors

A *family* (``FAMILIES``, one per transformers ``model_type``) knows two things:

- ``plan(hf_config)``: the hybridseq layout of a checkpoint (a config dict: model keys, block
  specs, the stack) and the tensor *rules*: for every hybridseq tensor, the checkpoint tensors it
  is made of and the two transforms between them (a concatenation of gate and up projections,
  the experts stacked into one tensor, a conv weight without its singleton axis, ...);
- ``hf_config(cfg)``: the checkpoint config of a hybridseq config, or ``Unfit`` saying why this
  family cannot hold that layout.

Import reads ``config.json``, plans, applies the rules to the safetensors tensors and loads the
result strictly: a checkpoint tensor no rule reads, a tensor a rule needs but the folder lacks,
and a config value the layout cannot represent are errors that name them. Export writes a
family's config, plans from it again (the same code as import), checks that the plan rebuilds
exactly the model's config (equal ``config_hash``; else the differences are named), and writes
the tensors through the rules' inverse transforms. So what export writes is, by construction,
what import reads back.

The transformers modules themselves are not needed for either direction (the tests load the
results with transformers to compare logits).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import HybridSeqError

# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------


class HFError(HybridSeqError):
    """A checkpoint that cannot be read as its family says (missing or extra tensors, shapes)."""


class HFUnsupported(HybridSeqError, NotImplementedError):
    """A config value (or a layout, on export) that hybridseq cannot represent in this direction."""


class Unfit(Exception):
    """Raised by a family's ``hf_config``: this layout does not fit the family (the reason)."""


# ----------------------------------------------------------------------------------------------
# tensor rules
# ----------------------------------------------------------------------------------------------
Tensors = list


@dataclass
class Rule:
    """One hybridseq tensor ``ours`` made of the checkpoint tensors ``theirs``: ``to_ours(list)
    -> tensor`` and ``to_theirs(tensor) -> list`` (in the order of ``theirs``). ``alt``: another
    rule for the same tensor in a second on-disk form (read when the first form is absent)."""

    ours: str
    theirs: tuple
    to_ours: Callable = lambda ts: ts[0]
    to_theirs: Callable = lambda t: [t]
    alt: "Rule | None" = None


def same(ours: str, theirs: str) -> Rule:
    return Rule(ours, (theirs,))


def conv(ours: str, theirs: str) -> Rule:
    """A depthwise conv: (C, 1, w) in the checkpoint, (C, w) in hybridseq."""
    return Rule(ours, (theirs,), lambda ts: ts[0][:, 0, :], lambda t: [t.unsqueeze(1)])


def transposed(ours: str, theirs: str) -> Rule:
    return Rule(ours, (theirs,), lambda ts: ts[0].t(), lambda t: [t.t()])


def rows(ours: str, parts: list[str], sizes: list[int]) -> Rule:
    """``ours`` = the checkpoint tensors stacked along dim 0 (e.g. [gate; up])."""
    return Rule(ours, tuple(parts), lambda ts: torch.cat(ts, 0), lambda t: list(t.split(sizes, 0)))


def cols_t(ours: str, parts: list[str], sizes: list[int]) -> Rule:
    """``ours`` = the transpose of the checkpoint tensors stacked along dim 0 (a fused (d, n f)
    input projection made of (f, d) nn.Linear weights)."""
    return Rule(ours, tuple(parts), lambda ts: torch.cat(ts, 0).t(),
                lambda t: list(t.t().split(sizes, 0)))


def experts_in(ours: str, per_expert: list[list[str]], f: int) -> Rule:
    """w_in (E, d, n f) from, per expert, its (f, d) input projections (gate first)."""
    n = len(per_expert[0])
    flat = tuple(k for keys in per_expert for k in keys)

    def to_ours(ts):
        return torch.stack([torch.cat(ts[e * n:(e + 1) * n], 0).t() for e in range(len(per_expert))])

    def to_theirs(t):
        return [p for e in range(t.shape[0]) for p in t[e].t().split([f] * n, 0)]

    return Rule(ours, flat, to_ours, to_theirs)


def experts_out(ours: str, per_expert: list[str]) -> Rule:
    """w_out (E, f, d) from, per expert, its (d, f) output projection."""
    return Rule(ours, tuple(per_expert), lambda ts: torch.stack([x.t() for x in ts]),
                lambda t: [t[e].t() for e in range(t.shape[0])])


def fused_t(ours: str, theirs: str) -> Rule:
    """A 3-D expert tensor whose last two axes are swapped between the two formats."""
    return Rule(ours, (theirs,), lambda ts: ts[0].transpose(1, 2), lambda t: [t.transpose(1, 2)])


# ----------------------------------------------------------------------------------------------
# reading a config
# ----------------------------------------------------------------------------------------------
class Config:
    """A checkpoint's config.json with its family's defaults (the transformers config classes'
    defaults, for keys a config.json may leave out)."""

    def __init__(self, data: dict, defaults: dict, family: str):
        self.data = dict(data)
        self.defaults = defaults
        self.family = family

    def get(self, key: str, default: Any = None):
        if key in self.data and self.data[key] is not None:
            return self.data[key]
        return self.defaults.get(key, default)

    def get_any(self, *keys: str):
        """The first of ``keys`` (names transformers treats as aliases) the file holds, else the
        first default among them."""
        for k in keys:
            if self.has(k):
                return self.data[k]
        for k in keys:
            if self.defaults.get(k) is not None:
                return self.defaults[k]
        return None

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def need(self, key: str):
        v = self.get(key)
        if v is None:
            raise HFError(f"{self.family} config.json: missing '{key}'")
        return v

    def refuse(self, key: str, why: str):
        raise HFUnsupported(f"{self.family} config.json: {key}={self.data.get(key, self.defaults.get(key))!r} "
                            f"is not supported: {why}")

    def expect(self, key: str, allowed, why: str = ""):
        """Refuse ``key`` unless its value is one of ``allowed``."""
        v = self.get(key)
        if v not in (allowed if isinstance(allowed, (list, tuple, set)) else [allowed]):
            self.refuse(key, why or f"hybridseq supports {allowed!r}")
        return v


def _act(c: Config, key: str = "hidden_act", allowed=("silu", "swish")):
    c.expect(key, allowed, "the gated MLP and the Mamba blocks use SiLU")


def rope_of(c: Config) -> tuple[float | None, dict | None, float]:
    """(rope_theta, rope_scaling for the attention spec, partial_rotary) from the config's
    ``rope_parameters`` (transformers 5) or ``rope_theta`` / ``rope_scaling`` /
    ``partial_rotary_factor`` (older files)."""
    params = c.data.get("rope_parameters")
    if isinstance(params, dict) and params and any(isinstance(v, dict) for v in params.values()):
        c.refuse("rope_parameters", "RoPE parameters per layer type")
    params = dict(params or {})
    scaling = c.data.get("rope_scaling")
    if isinstance(scaling, dict):
        params = {**scaling, **params}
    theta = params.get("rope_theta", c.data.get("rope_theta", c.defaults.get("rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor",
                         c.data.get("partial_rotary_factor", c.defaults.get("partial_rotary_factor", 1.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(theta), None, float(partial)
    if kind not in ("linear", "llama3", "yarn"):
        c.refuse("rope_parameters", f"rope_type {kind!r} (hybridseq has default, linear, llama3 and yarn)")
    out: dict[str, Any] = {"type": kind, "factor": params.get("factor")}
    if kind in ("llama3", "yarn"):
        out["original_max_position_embeddings"] = params.get(
            "original_max_position_embeddings", c.get("max_position_embeddings"))
    if kind == "yarn" and out["factor"] is None:
        out["factor"] = c.need("max_position_embeddings") / out["original_max_position_embeddings"]
    if kind == "llama3":
        out["low_freq_factor"] = params.get("low_freq_factor")
        out["high_freq_factor"] = params.get("high_freq_factor")
    if kind == "yarn":
        for k in ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate"):
            if params.get(k) is not None:
                out[k] = params[k]
    missing = [k for k, v in out.items() if v is None]
    if missing:
        raise HFError(f"{c.family} config.json: rope_parameters of type {kind} lacks {', '.join(missing)}")
    return float(theta), out, float(partial)


def rope_to_hf(spec) -> dict:
    """transformers' ``rope_parameters`` of an attention spec."""
    out: dict[str, Any] = {"rope_type": "default", "rope_theta": float(spec.rope_theta)}
    if spec.rope_scaling:
        rs = dict(spec.rope_scaling)
        out["rope_type"] = rs.pop("type")
        out.update(rs)
    if spec.partial_rotary != 1.0:
        out["partial_rotary_factor"] = float(spec.partial_rotary)
    return out


# ----------------------------------------------------------------------------------------------
# the plan of a checkpoint
# ----------------------------------------------------------------------------------------------
@dataclass
class Sub:
    """One hybridseq sublayer: its block spec (a dict with ``kind``), the checkpoint key of the
    norm before it, and the rules of its block's tensors relative to ``layers.<i>.block.``."""

    spec: dict
    norm: str
    rules: list


@dataclass
class Plan:
    family: "Family"
    model: dict                       # hybridseq ``model`` section
    subs: list = field(default_factory=list)
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    skip: tuple = ()                  # checkpoint tensors read by no rule on purpose

    def config(self, name: str) -> dict:
        """The hybridseq config dict: one symbol per distinct block spec, the stack compressed
        into a repeat where it is one."""
        symbols: dict[str, str] = {}
        blocks: dict[str, dict] = {}
        stack = []
        letters = {"attention": "A", "mlp": "F", "moe": "E", "mamba": "M", "mamba2": "M"}
        for sub in self.subs:
            key = repr(sorted(sub.spec.items()))
            if key not in symbols:
                base = letters.get(sub.spec["kind"], "B")
                n = sum(1 for s in symbols.values() if s.rstrip("0123456789") == base)
                sym = base if n == 0 else f"{base}{n + 1}"
                symbols[key] = sym
                blocks[sym] = dict(sub.spec)
            stack.append(symbols[key])
        return {"name": name, "description": f"imported from {self.family.architecture}",
                "model": dict(self.model), "blocks": blocks, "layout": compress(stack)}

    def rules(self, vocab: int, padded: int, tied: bool) -> list[Rule]:
        """Every tensor rule of the model, with the embedding (and head) padded from ``vocab``
        rows to ``padded``."""
        def pad(ts):
            t = ts[0]
            if padded == t.shape[0]:
                return t
            if t.shape[0] != vocab:
                return t  # the shape check names it
            return torch.cat([t, t.new_zeros(padded - vocab, *t.shape[1:])], 0)

        def unpad(t):
            return [t[:vocab]]

        out = [Rule("embed.weight", (self.embed,), pad, unpad)]
        for i, sub in enumerate(self.subs):
            out.append(same(f"layers.{i}.norm.weight", sub.norm))
            for r in sub.rules:
                out.append(_prefixed(r, f"layers.{i}.block."))
        out.append(same("norm_f.weight", self.final_norm))
        if not tied:
            out.append(Rule("lm_head.weight", (self.lm_head,), pad, unpad))
        return out


def _prefixed(r: Rule, prefix: str) -> Rule:
    return Rule(prefix + r.ours, r.theirs, r.to_ours, r.to_theirs,
                None if r.alt is None else _prefixed(r.alt, prefix))


def compress(stack: list[str]) -> str:
    """The stack as a pattern: ``(A F)*32`` when it is one unit repeated, else the symbols."""
    n = len(stack)
    for p in range(1, n // 2 + 1):
        if n % p == 0 and stack == stack[:p] * (n // p):
            unit = " ".join(stack[:p])
            return f"({unit})*{n // p}" if p > 1 else f"{unit}*{n // p}"
    return " ".join(stack)


# ----------------------------------------------------------------------------------------------
# block pieces
# ----------------------------------------------------------------------------------------------
def attention_sub(c: Config, p: str, *, bias: bool | str = False, qk_norm=None, rope=True,
                  window=None, norm: str, clip=None, softmax_scale=None, partial_ok: bool = False,
                  q="q_proj", k="k_proj", v="v_proj", o="o_proj") -> Sub:
    """An attention sublayer. ``partial_ok``: the family rotates ``partial_rotary_factor`` of each
    head (Bamba); the others rotate whole heads whatever the config says, as transformers does."""
    h = int(c.need("num_attention_heads"))
    kv = int(c.get("num_key_value_heads") or h)
    d = int(c.need("hidden_size"))
    hd = c.get("head_dim")
    hd = int(hd) if hd else d // h
    if hd * h != d and not c.get("head_dim"):
        raise HFError(f"{c.family} config.json: num_attention_heads={h} does not divide hidden_size={d}")
    spec: dict[str, Any] = {"kind": "attention", "n_heads": h, "n_kv_heads": kv, "head_dim": hd,
                            "rope_theta": None, "window": window, "bias": bias}
    if rope:
        theta, scaling, partial = rope_of(c)
        spec["rope_theta"] = theta
        if scaling:
            spec["rope_scaling"] = scaling
        if partial != 1.0 and partial_ok:
            spec["partial_rotary"] = partial
    if qk_norm:
        spec["qk_norm"] = qk_norm
        spec["qk_norm_eps"] = float(c.get("rms_norm_eps"))
    if clip is not None:
        spec["clip_qkv"] = float(clip)
    if softmax_scale is not None and float(softmax_scale) != hd ** -0.5:
        spec["softmax_scale"] = float(softmax_scale)
    rules = []
    for ours, theirs in (("q_proj", q), ("k_proj", k), ("v_proj", v), ("o_proj", o)):
        rules.append(same(f"{ours}.weight", f"{p}.{theirs}.weight"))
        if bias and not (ours == "o_proj" and bias == "qkv"):
            rules.append(same(f"{ours}.bias", f"{p}.{theirs}.bias"))
    if qk_norm:
        rules += [same("q_norm.weight", f"{p}.q_norm.weight"), same("k_norm.weight", f"{p}.k_norm.weight")]
    return Sub(spec, norm, rules)


def swiglu_sub(p: str, d_ff: int, *, norm: str, bias: bool = False, gate="gate_proj", up="up_proj",
               down="down_proj") -> Sub:
    rules = [rows("gate_up_proj.weight", [f"{p}.{gate}.weight", f"{p}.{up}.weight"], [d_ff, d_ff]),
             same("down_proj.weight", f"{p}.{down}.weight")]
    if bias:
        rules += [rows("gate_up_proj.bias", [f"{p}.{gate}.bias", f"{p}.{up}.bias"], [d_ff, d_ff]),
                  same("down_proj.bias", f"{p}.{down}.bias")]
    return Sub({"kind": "mlp", "d_ff": int(d_ff), "activation": "swiglu", "bias": bool(bias)}, norm, rules)


def relu2_sub(p: str, d_ff: int, *, norm: str, bias: bool = False) -> Sub:
    rules = [same("up_proj.weight", f"{p}.up_proj.weight"), same("down_proj.weight", f"{p}.down_proj.weight")]
    if bias:
        rules += [same("up_proj.bias", f"{p}.up_proj.bias"), same("down_proj.bias", f"{p}.down_proj.bias")]
    return Sub({"kind": "mlp", "d_ff": int(d_ff), "activation": "relu2", "bias": bool(bias)}, norm, rules)


def moe_sub(p: str, n_experts: int, top_k: int, d_ff: int, *, norm: str, renormalize: bool,
            router: str = "gate.weight", expert: str = "experts.{e}.{w}.weight",
            names=("gate_proj", "up_proj", "down_proj"), fused: tuple | None = None,
            shared: dict | None = None, extra_spec: dict | None = None, extra_rules=()) -> Sub:
    """A softmax-routed MoE of gated experts stored one module per expert (``expert`` with ``{e}``
    and ``{w}``, ``names`` = gate, up, down) or, with ``fused`` = (gate_up key, down key), as two
    3-D tensors (E, 2 f, d), (E, d, f) (transformers 5's in-memory form, read too)."""
    spec: dict[str, Any] = {"kind": "moe", "n_experts": int(n_experts), "top_k": int(top_k),
                            "d_ff": int(d_ff), "activation": "swiglu", "router": "softmax",
                            "renormalize": bool(renormalize)}
    gate, up, down = names
    per = [[f"{p}.{expert.format(e=e, w=gate)}", f"{p}.{expert.format(e=e, w=up)}"] for e in range(n_experts)]
    w_in = experts_in("w_in", per, d_ff)
    w_out = experts_out("w_out", [f"{p}.{expert.format(e=e, w=down)}" for e in range(n_experts)])
    if fused:
        w_in.alt = fused_t("w_in", f"{p}.{fused[0]}")
        w_out.alt = fused_t("w_out", f"{p}.{fused[1]}")
    rules = [same("router.weight", f"{p}.{router}"), w_in, w_out, *extra_rules]
    if shared:
        spec["shared_experts"] = 1
        spec["shared_d_ff"] = int(shared["d_ff"])
        sp, sf = shared["prefix"], int(shared["d_ff"])
        rules += [cols_t("shared_w_in", [f"{sp}.{gate}.weight", f"{sp}.{up}.weight"], [sf, sf]),
                  transposed("shared_w_out", f"{sp}.{down}.weight")]
        if shared.get("gate"):
            spec["shared_expert_gate"] = True
            rules.append(same("shared_gate.weight", shared["gate"]))
    spec.update(extra_spec or {})
    return Sub(spec, norm, rules)


def mamba_sub(c: Config, p: str, *, norm: str, d_state, d_conv, expand, dt_rank, conv_bias, bias,
              inner_norms="none", inner_eps=None) -> Sub:
    d = int(c.need("hidden_size"))
    spec: dict[str, Any] = {"kind": "mamba", "d_state": int(d_state), "d_conv": int(d_conv),
                            "expand": int(expand), "dt_rank": "auto" if dt_rank == "auto" else int(dt_rank),
                            "conv_bias": bool(conv_bias), "bias": bool(bias)}
    if dt_rank == "auto" or int(dt_rank) == math.ceil(d / 16):
        spec["dt_rank"] = "auto"
    if inner_norms != "none":
        spec["inner_norms"] = inner_norms
        spec["inner_norm_eps"] = float(inner_eps)
    rules = [same("in_proj.weight", f"{p}.in_proj.weight"), conv("conv_weight", f"{p}.conv1d.weight"),
             same("x_proj.weight", f"{p}.x_proj.weight"), same("dt_proj.weight", f"{p}.dt_proj.weight"),
             same("dt_proj.bias", f"{p}.dt_proj.bias"), same("A_log", f"{p}.A_log"), same("D", f"{p}.D"),
             same("out_proj.weight", f"{p}.out_proj.weight")]
    if conv_bias:
        rules.append(same("conv_bias", f"{p}.conv1d.bias"))
    if bias:
        rules += [same("in_proj.bias", f"{p}.in_proj.bias"), same("out_proj.bias", f"{p}.out_proj.bias")]
    if inner_norms == "rms":
        rules += [same("dt_norm.weight", f"{p}.dt_layernorm.weight"),
                  same("b_norm.weight", f"{p}.b_layernorm.weight"),
                  same("c_norm.weight", f"{p}.c_layernorm.weight")]
    return Sub(spec, norm, rules)


def mamba2_sub(c: Config, p: str, *, norm: str, n_heads, head_dim, d_state, n_groups, d_conv,
               chunk_size, dt_limit, conv_bias, bias, eps, expand_key: str) -> Sub:
    d = int(c.need("hidden_size"))
    di = int(n_heads) * int(head_dim)
    if di % d:
        c.refuse(expand_key, f"the Mamba-2 width {n_heads} heads x {head_dim} = {di} is not a multiple "
                 f"of hidden_size={d} (hybridseq's mamba2 has d_inner = expand * d_model)")
    lim = None
    if dt_limit is not None:
        lo, hi = (float(v) for v in dt_limit)
        if not (lo == 0.0 and math.isinf(hi)):
            lim = [lo, hi]
    chunk = int(chunk_size)
    if chunk & (chunk - 1) or not 16 <= chunk <= 1024:
        chunk = 256  # chunk_size only changes the blocking of the scan, not its result
    spec = {"kind": "mamba2", "d_state": int(d_state), "d_conv": int(d_conv), "expand": di // d,
            "headdim": int(head_dim), "ngroups": int(n_groups), "chunk_size": chunk, "dt_limit": lim,
            "rmsnorm": True, "norm_eps": float(eps), "D_has_hdim": False, "bias": bool(bias),
            "conv_bias": bool(conv_bias)}
    rules = [same("in_proj.weight", f"{p}.in_proj.weight"), conv("conv_weight", f"{p}.conv1d.weight"),
             same("dt_bias", f"{p}.dt_bias"), same("A_log", f"{p}.A_log"), same("D", f"{p}.D"),
             same("norm_weight", f"{p}.norm.weight"), same("out_proj.weight", f"{p}.out_proj.weight")]
    if conv_bias:
        rules.append(same("conv_bias", f"{p}.conv1d.bias"))
    if bias:
        rules += [same("in_proj.bias", f"{p}.in_proj.bias"), same("out_proj.bias", f"{p}.out_proj.bias")]
    return Sub(spec, norm, rules)


def _model(c: Config, eps_key: str = "rms_norm_eps", **extra) -> dict:
    return {"d_model": int(c.need("hidden_size")), "vocab_size": int(c.need("vocab_size")),
            "tie_embeddings": bool(c.get("tie_word_embeddings")), "norm": "rmsnorm",
            "norm_eps": float(c.get(eps_key)), **extra}


def _n_layers(c: Config) -> int:
    return int(c.need("num_hidden_layers"))


# ----------------------------------------------------------------------------------------------
# families: checkpoint config -> plan
# ----------------------------------------------------------------------------------------------
def _sliding(c: Config, family: str) -> list:
    """Per layer: the sliding window (int) or None, from ``layer_types`` / ``use_sliding_window``
    (Qwen2/Qwen3) or ``sliding_window`` on every layer (Mistral, Mixtral)."""
    n = _n_layers(c)
    if family in ("mistral", "mixtral"):
        w = c.data.get("sliding_window", c.defaults.get("sliding_window"))
        return [int(w) if w else None] * n
    w = c.data.get("sliding_window", c.defaults.get("sliding_window"))
    types = c.data.get("layer_types")
    if types:
        if len(types) != n:
            raise HFError(f"{c.family} config.json: layer_types has {len(types)} entries for {n} layers")
        bad = sorted(set(types) - {"full_attention", "sliding_attention"})
        if bad:
            c.refuse("layer_types", f"layer types {bad}")
        return [int(w) if t == "sliding_attention" and w else None for t in types]
    if not c.get("use_sliding_window") or not w:
        return [None] * n
    if family == "qwen3_moe":
        return [int(w)] * n
    first = int(c.get("max_window_layers") or 0)
    return [int(w) if i >= first else None for i in range(n)]


def plan_decoder(c: Config, fam: "Family") -> Plan:
    """Llama, Mistral, Qwen2, Qwen3 and the MoE decoders (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE):
    per layer an attention sublayer and a feed-forward (mlp or moe) sublayer."""
    t = fam.model_type
    _act(c)
    n = _n_layers(c)
    windows = _sliding(c, t)
    plan = Plan(fam, _model(c))
    attn_bias: bool | str = False
    qk = None
    clip = None
    if t == "llama":
        attn_bias = bool(c.get("attention_bias"))
    elif t in ("qwen2",):
        attn_bias = "qkv"
    elif t == "qwen2_moe":
        attn_bias = "qkv" if c.get("qkv_bias", True) else False
    elif t in ("qwen3", "qwen3_moe"):
        attn_bias = bool(c.get("attention_bias"))
        qk = "per_head"
    elif t == "olmoe":
        attn_bias = bool(c.get("attention_bias"))
        qk = "full"
        clip = c.get("clip_qkv")
        d, h = int(c.need("hidden_size")), int(c.need("num_attention_heads"))
        if c.get("head_dim") and int(c.get("head_dim")) * h != d:
            c.refuse("head_dim", "OLMoE sizes its QK-norms by hidden_size / num_attention_heads")
    mlp_bias = bool(c.get("mlp_bias")) if t == "llama" else False
    for i in range(n):
        p = f"model.layers.{i}"
        plan.subs.append(attention_sub(c, f"{p}.self_attn", bias=attn_bias, qk_norm=qk, clip=clip,
                                       window=windows[i], norm=f"{p}.input_layernorm.weight"))
        fnorm = f"{p}.post_attention_layernorm.weight"
        if t in ("llama", "mistral", "qwen2", "qwen3"):
            plan.subs.append(swiglu_sub(f"{p}.mlp", int(c.need("intermediate_size")), norm=fnorm, bias=mlp_bias))
        elif t == "mixtral":
            E = int(c.get_any("num_local_experts", "num_experts"))
            plan.subs.append(moe_sub(f"{p}.block_sparse_moe", E, int(c.need("num_experts_per_tok")),
                                     int(c.need("intermediate_size")), norm=fnorm, renormalize=True,
                                     expert="experts.{e}.{w}.weight", names=("w1", "w3", "w2")))
            _alt_mixtral(plan.subs[-1], p)
        else:  # qwen2_moe, qwen3_moe, olmoe
            E = int(c.get_any("num_experts", "num_local_experts") or 0)
            sparse = E > 0
            if t in ("qwen2_moe", "qwen3_moe"):
                step = int(c.get("decoder_sparse_step") or 1)
                sparse = sparse and i not in (c.get("mlp_only_layers") or []) and (i + 1) % step == 0
            if not sparse:
                plan.subs.append(swiglu_sub(f"{p}.mlp", int(c.need("intermediate_size")), norm=fnorm))
                continue
            shared = None
            if t == "qwen2_moe" and int(c.get("shared_expert_intermediate_size") or 0) > 0:
                shared = {"prefix": f"{p}.mlp.shared_expert", "d_ff": int(c.get("shared_expert_intermediate_size")),
                          "gate": f"{p}.mlp.shared_expert_gate.weight"}
            f = int(c.need("moe_intermediate_size") if t != "olmoe" else c.need("intermediate_size"))
            plan.subs.append(moe_sub(f"{p}.mlp", E, int(c.need("num_experts_per_tok")), f, norm=fnorm,
                                     renormalize=bool(c.get("norm_topk_prob")), shared=shared,
                                     fused=("experts.gate_up_proj", "experts.down_proj")))
    return plan


def _alt_mixtral(sub: Sub, p: str) -> None:
    """Mixtral's transformers-5 in-memory names (``mlp.gate``, ``mlp.experts.gate_up_proj``)."""
    for r in sub.rules:
        if r.ours == "router.weight":
            r.alt = same("router.weight", f"{p}.mlp.gate.weight")
        elif r.ours == "w_in":
            r.alt = fused_t("w_in", f"{p}.mlp.experts.gate_up_proj")
        elif r.ours == "w_out":
            r.alt = fused_t("w_out", f"{p}.mlp.experts.down_proj")


def plan_mamba(c: Config, fam: "Family") -> Plan:
    """Mamba and FalconMamba: one Mamba-1 sublayer per layer (FalconMamba: weightless RMSNorms
    on dt, B and C, epsilon ``mixer_rms_eps``)."""
    _act(c)
    d = int(c.need("hidden_size"))
    di = int(c.get("intermediate_size") or int(c.get("expand")) * d)
    if di % d:
        c.refuse("intermediate_size", f"{di} is not a multiple of hidden_size={d}")
    rank = c.get("time_step_rank")
    falcon = fam.model_type == "falcon_mamba"
    plan = Plan(fam, _model(c, "layer_norm_epsilon"), embed="backbone.embeddings.weight",
                final_norm="backbone.norm_f.weight")
    for i in range(_n_layers(c)):
        p = f"backbone.layers.{i}"
        plan.subs.append(mamba_sub(
            c, f"{p}.mixer", norm=f"{p}.norm.weight", d_state=c.get("state_size"), d_conv=c.get("conv_kernel"),
            expand=di // d, dt_rank="auto" if rank in (None, "auto") else rank, conv_bias=c.get("use_conv_bias"),
            bias=c.get("use_bias"), inner_norms="rms_weightless" if falcon else "none",
            inner_eps=c.get("mixer_rms_eps") if falcon else None))
    return plan


def plan_jamba(c: Config, fam: "Family") -> Plan:
    """Jamba: per layer a Mamba-1 (learned RMSNorms on dt, B and C) or an attention sublayer
    without positions, then an MLP or a softmax MoE without renormalisation."""
    _act(c)
    n = _n_layers(c)
    rank = c.get("mamba_dt_rank")
    plan = Plan(fam, _model(c), final_norm="model.final_layernorm.weight")
    ap, ao = int(c.get("attn_layer_period")), int(c.get("attn_layer_offset"))
    ep, eo = int(c.get("expert_layer_period")), int(c.get("expert_layer_offset"))
    E = int(c.get_any("num_experts", "num_local_experts"))
    ff = int(c.need("intermediate_size"))
    for i in range(n):
        p = f"model.layers.{i}"
        norm = f"{p}.input_layernorm.weight"
        if i % ap == ao:
            plan.subs.append(attention_sub(c, f"{p}.self_attn", rope=False, norm=norm))
        else:
            plan.subs.append(mamba_sub(
                c, f"{p}.mamba", norm=norm, d_state=c.get("mamba_d_state"), d_conv=c.get("mamba_d_conv"),
                expand=c.get("mamba_expand"), dt_rank="auto" if rank in (None, "auto") else rank,
                conv_bias=c.get("mamba_conv_bias"), bias=c.get("mamba_proj_bias"), inner_norms="rms",
                inner_eps=c.get("rms_norm_eps")))
        fnorm = f"{p}.pre_ff_layernorm.weight"
        if E > 1 and i % ep == eo:
            plan.subs.append(moe_sub(f"{p}.feed_forward", E, int(c.need("num_experts_per_tok")), ff, norm=fnorm,
                                     renormalize=False, router="router.weight",
                                     fused=("experts.gate_up_proj", "experts.down_proj")))
        else:
            plan.subs.append(swiglu_sub(f"{p}.feed_forward", ff, norm=fnorm))
    return plan


def _mamba2_args(c: Config, prefix: str = "mamba_") -> dict:
    d = int(c.need("hidden_size"))
    heads = int(c.need(f"{prefix}n_heads"))
    hd = c.get(f"{prefix}d_head")
    if hd in (None, "auto"):
        hd = int(c.get(f"{prefix}expand")) * d // heads
    return {"n_heads": heads, "head_dim": int(hd), "d_state": c.get(f"{prefix}d_state"),
            "n_groups": c.get(f"{prefix}n_groups"), "d_conv": c.get(f"{prefix}d_conv"),
            "chunk_size": c.get(f"{prefix}chunk_size"), "dt_limit": c.get("time_step_limit"),
            "conv_bias": c.get(f"{prefix}conv_bias"), "bias": c.get(f"{prefix}proj_bias"),
            "eps": c.get("rms_norm_eps"), "expand_key": f"{prefix}n_heads"}


def _types(c: Config, key_order=("layer_types", "layers_block_type")) -> list[str]:
    legacy = {"mamba": "linear_attention", "attention": "full_attention"}
    for key in key_order:
        v = c.data.get(key)
        if v:
            return [legacy.get(t, t) for t in v]
    return []


def plan_bamba(c: Config, fam: "Family") -> Plan:
    """Bamba: per layer a Mamba-2 or (``attn_layer_indices``) an attention sublayer with partial
    RoPE, then a SwiGLU MLP."""
    _act(c)
    n = _n_layers(c)
    attn = set(c.get("attn_layer_indices") or [])
    plan = Plan(fam, _model(c), final_norm="model.final_layernorm.weight")
    m2 = _mamba2_args(c)
    for i in range(n):
        p = f"model.layers.{i}"
        norm = f"{p}.input_layernorm.weight"
        if i in attn:
            plan.subs.append(attention_sub(c, f"{p}.self_attn", bias=bool(c.get("attention_bias")), norm=norm,
                                           partial_ok=True))
        else:
            plan.subs.append(mamba2_sub(c, f"{p}.mamba", norm=norm, **m2))
        plan.subs.append(swiglu_sub(f"{p}.feed_forward", int(c.need("intermediate_size")),
                                    norm=f"{p}.pre_ff_layernorm.weight", bias=bool(c.get("mlp_bias"))))
    return plan


NEMOTRON_CHARS = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}


def plan_nemotron_h(c: Config, fam: "Family") -> Plan:
    """Nemotron-H: one sublayer per layer, Mamba-2 (``M``), attention without positions (``*``),
    a squared-ReLU MLP (``-``) or a sigmoid-routed squared-ReLU MoE with a shared expert (``E``)."""
    c.expect("mamba_hidden_act", ("silu",), "the Mamba-2 block uses SiLU")
    if int(c.get("num_nextn_predict_layers") or 0) > 0:
        c.refuse("num_nextn_predict_layers", "multi-token-prediction layers")
    c.expect("mlp_hidden_act", ("relu2",), "hybridseq's mlp has relu2 (squared ReLU) for Nemotron-H")
    types = _types(c, ("layers_block_type", "layer_types"))
    if not types:
        pattern = c.get("hybrid_override_pattern")
        if not pattern:
            raise HFError("nemotron_h config.json: no layers_block_type or hybrid_override_pattern")
        bad = sorted(set(pattern) - set(NEMOTRON_CHARS))
        if bad:
            c.refuse("hybrid_override_pattern", f"layer characters {bad}")
        types = [NEMOTRON_CHARS[ch] for ch in pattern]
    plan = Plan(fam, _model(c, "layer_norm_epsilon"), embed="backbone.embeddings.weight",
                final_norm="backbone.norm_f.weight")
    heads = int(c.need("mamba_num_heads"))
    m2 = {"n_heads": heads, "head_dim": int(c.need("mamba_head_dim")), "d_state": c.get("ssm_state_size"),
          "n_groups": c.get("n_groups", c.get("mamba_n_groups")), "d_conv": c.get("conv_kernel"),
          "chunk_size": c.get("chunk_size"), "dt_limit": c.get("time_step_limit"),
          "conv_bias": c.get("use_conv_bias"), "bias": c.get("use_bias"), "eps": c.get("layer_norm_epsilon"),
          "expand_key": "mamba_num_heads"}
    for i, t in enumerate(types):
        p = f"backbone.layers.{i}"
        norm = f"{p}.norm.weight"
        if t == "linear_attention":
            plan.subs.append(mamba2_sub(c, f"{p}.mixer", norm=norm, **m2))
        elif t == "full_attention":
            if c.get("sliding_window"):
                c.refuse("sliding_window", "a window on Nemotron-H's attention layers")
            plan.subs.append(attention_sub(c, f"{p}.mixer", rope=False, norm=norm))
        elif t == "mlp":
            plan.subs.append(relu2_sub(f"{p}.mixer", int(c.need("intermediate_size")), norm=norm,
                                       bias=bool(c.get("mlp_bias"))))
        elif t == "moe":
            plan.subs.append(_nemotron_moe(c, f"{p}.mixer", norm))
        else:
            c.refuse("layers_block_type", f"layer type {t!r}")
    return plan


def _nemotron_moe(c: Config, p: str, norm: str) -> Sub:
    if c.get("moe_latent_size") is not None:
        c.refuse("moe_latent_size", "latent MoE projections")
    E = int(c.get_any("n_routed_experts", "num_local_experts"))
    k = int(c.need("num_experts_per_tok"))
    groups, top_groups = int(c.get("n_group") or 1), int(c.get("topk_group") or 1)
    if groups != 1 and top_groups != groups:
        c.refuse("n_group", f"group-limited routing (n_group={groups}, topk_group={top_groups})")
    renorm = bool(c.get("norm_topk_prob"))
    if renorm and k == 1:
        c.refuse("norm_topk_prob", "renormalising a single routed expert")
    if bool(c.get("mlp_bias")):
        c.refuse("mlp_bias", "biases in the MoE experts")
    f = int(c.need("moe_intermediate_size"))
    spec = {"kind": "moe", "n_experts": E, "top_k": k, "d_ff": f, "activation": "relu2", "router": "sigmoid",
            "renormalize": renorm}
    scale = float(c.get("routed_scaling_factor") or 1.0)
    if scale != 1.0:
        spec["routed_scale"] = scale
    rules = [same("router.weight", f"{p}.gate.weight"), same("router.expert_bias", f"{p}.gate.e_score_correction_bias"),
             experts_in("w_in", [[f"{p}.experts.{e}.up_proj.weight"] for e in range(E)], f),
             experts_out("w_out", [f"{p}.experts.{e}.down_proj.weight" for e in range(E)])]
    rules[2].alt = fused_t("w_in", f"{p}.experts.up_proj")
    rules[3].alt = fused_t("w_out", f"{p}.experts.down_proj")
    n_shared = int(c.get("n_shared_experts") or 0)
    if n_shared:
        sf = int(c.need("moe_shared_expert_intermediate_size"))
        if n_shared != 1:
            c.refuse("n_shared_experts", "more than one shared expert module")
        spec.update(shared_experts=1, shared_d_ff=sf)
        rules += [transposed("shared_w_in", f"{p}.shared_experts.up_proj.weight"),
                  transposed("shared_w_out", f"{p}.shared_experts.down_proj.weight")]
    return Sub(spec, norm, rules)


def plan_granite(c: Config, fam: "Family") -> Plan:
    """GraniteMoeHybrid (Granite 4.0-H): per layer a Mamba-2 or an attention sublayer (RoPE when
    ``position_embedding_type: rope``, score scale ``attention_multiplier``), then a softmax MoE
    with one shared expert (or only the shared MLP without experts); the embedding, residual and
    logits constants become model keys."""
    _act(c)
    types = _types(c)
    n = _n_layers(c)
    if not types:
        types = ["linear_attention"] * n
    if len(types) != n:
        raise HFError(f"granitemoehybrid config.json: layer_types has {len(types)} entries for {n} layers")
    pos = c.get("position_embedding_type")
    if pos not in (None, "rope", "nope"):
        c.refuse("position_embedding_type", "hybridseq has rope or none")
    plan = Plan(fam, _model(c, embedding_multiplier=float(c.get("embedding_multiplier")),
                            residual_multiplier=float(c.get("residual_multiplier")),
                            logits_scaling=float(c.get("logits_scaling"))))
    m2 = _mamba2_args(c)
    E = int(c.get_any("num_local_experts", "num_experts") or 0)
    for i, t in enumerate(types):
        p = f"model.layers.{i}"
        norm = f"{p}.input_layernorm.weight"
        if t == "linear_attention":
            plan.subs.append(mamba2_sub(c, f"{p}.mamba", norm=norm, **m2))
        elif t == "full_attention":
            plan.subs.append(attention_sub(c, f"{p}.self_attn", bias=bool(c.get("attention_bias")),
                                           rope=pos == "rope", norm=norm,
                                           softmax_scale=float(c.get("attention_multiplier"))))
        else:
            c.refuse("layer_types", f"layer type {t!r}")
        fnorm = f"{p}.post_attention_layernorm.weight"
        sf = int(c.need("shared_intermediate_size"))
        if E > 0:
            # input_linear (E, 2 f, d) holds each expert's gate rows then its up rows, as w_in's
            # columns; the shared MLP's input_linear likewise
            spec = {"kind": "moe", "n_experts": E, "top_k": int(c.need("num_experts_per_tok")),
                    "d_ff": int(c.need("intermediate_size")), "activation": "swiglu", "router": "softmax",
                    "renormalize": True, "shared_experts": 1, "shared_d_ff": sf}
            m = f"{p}.block_sparse_moe"
            rules = [same("router.weight", f"{m}.router.layer.weight"),
                     fused_t("w_in", f"{m}.input_linear.weight"), fused_t("w_out", f"{m}.output_linear.weight"),
                     transposed("shared_w_in", f"{p}.shared_mlp.input_linear.weight"),
                     transposed("shared_w_out", f"{p}.shared_mlp.output_linear.weight")]
            rules[0].alt = same("router.weight", f"{m}.router.weight")
            rules[1].alt = fused_t("w_in", f"{m}.experts.gate_up_proj")
            rules[2].alt = fused_t("w_out", f"{m}.experts.down_proj")
            plan.subs.append(Sub(spec, fnorm, rules))
        else:
            plan.subs.append(Sub({"kind": "mlp", "d_ff": sf, "activation": "swiglu", "bias": False}, fnorm,
                                 [same("gate_up_proj.weight", f"{p}.shared_mlp.input_linear.weight"),
                                  same("down_proj.weight", f"{p}.shared_mlp.output_linear.weight")]))
    return plan


# ----------------------------------------------------------------------------------------------
# families: hybridseq config -> checkpoint config (export)
# ----------------------------------------------------------------------------------------------
def _specs(cfg) -> list:
    return [spec for _, spec in cfg.layers()]


def _kinds(cfg) -> list[str]:
    return [spec.kind for spec in _specs(cfg)]


def _pairs(cfg, first: tuple, second: tuple, what: str) -> list[tuple]:
    """The stack as (mixer, feed-forward) pairs: kinds in ``first`` then ``second``."""
    specs = _specs(cfg)
    if len(specs) % 2 or not all(specs[i].kind in first and specs[i + 1].kind in second
                                 for i in range(0, len(specs), 2)):
        raise Unfit(f"needs {what} (the stack is {' '.join(_kinds(cfg))})")
    return [(specs[i], specs[i + 1]) for i in range(0, len(specs), 2)]


def _common_model(cfg) -> dict:
    m = cfg.model
    if m.norm != "rmsnorm":
        raise Unfit(f"model.norm is {m.norm} (transformers' families use RMSNorm)")
    for k in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
        if getattr(m, k) != 1.0:
            raise Unfit(f"model.{k}={getattr(m, k)} (only GraniteMoeHybrid has it)")
    return {"hidden_size": m.d_model, "vocab_size": int(m.vocab_size),
            "tie_word_embeddings": bool(m.tie_embeddings)}


def _one(values: list, what: str):
    """The single value all layers share, or Unfit."""
    distinct = []
    for v in values:
        if v not in distinct:
            distinct.append(v)
    if len(distinct) != 1:
        raise Unfit(f"the layers differ in {what} ({distinct[:3]})")
    return distinct[0]


def _attn_hf(specs: list, d_model: int, *, rope: bool = True) -> dict:
    a = specs[0]
    h, kv, hd = a.dims(d_model)
    out = {"num_attention_heads": h, "num_key_value_heads": kv, "head_dim": hd}
    _one([s.dims(d_model) for s in specs], "attention heads")
    if rope:
        if _one([s.rope_theta for s in specs], "rope_theta") is None:
            raise Unfit("attention without RoPE (rope_theta: null)")
        out["rope_parameters"] = rope_to_hf(a)
        _one([repr(rope_to_hf(s)) for s in specs], "RoPE parameters")
    elif any(s.rope_theta is not None for s in specs):
        raise Unfit("attention with RoPE (this family's attention has no positions)")
    return out


def _windows(specs: list) -> list:
    return [s.window for s in specs]


def hf_decoder(cfg, fam: "Family") -> dict:
    t = fam.model_type
    moe = t in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
    d = cfg.model.d_model
    out = _common_model(cfg)
    second = ("moe", "mlp") if t in ("qwen2_moe", "qwen3_moe") else (("moe",) if moe else ("mlp",))
    pairs = _pairs(cfg, ("attention",), second, f"attention then {' or '.join(second)} in every layer")
    attn = [a for a, _ in pairs]
    out.update(_attn_hf(attn, d))
    out["num_hidden_layers"] = len(pairs)
    out["rms_norm_eps"] = cfg.model.norm_eps
    out["hidden_act"] = "silu"
    wins = _windows(attn)
    if t in ("mistral", "mixtral"):
        out["sliding_window"] = _one(wins, "sliding window")
    elif t in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        w = sorted({x for x in wins if x is not None})
        if len(w) > 1:
            raise Unfit(f"several window sizes {w}")
        out["use_sliding_window"] = bool(w)
        out["sliding_window"] = w[0] if w else None
        out["layer_types"] = ["sliding_attention" if x else "full_attention" for x in wins]
        if t == "qwen3_moe" and w and any(x is None for x in wins):
            raise Unfit("Qwen3-MoE windows every layer or none")
        if t == "qwen2_moe" and not w:
            out["sliding_window"] = 0
    elif any(x is not None for x in wins):
        raise Unfit("a sliding window (Llama has none)")
    bias = _one([a.bias for a in attn], "attention bias")
    if t == "llama":
        if bias == "qkv":
            raise Unfit("q/k/v biases without an o bias")
        out["attention_bias"] = bool(bias)
    elif t == "qwen2":
        if bias != "qkv":
            raise Unfit("Qwen2 has q/k/v biases (bias: qkv)")
    elif t == "qwen2_moe":
        if bias is True:
            raise Unfit("an o_proj bias")
        out["qkv_bias"] = bias == "qkv"
    elif t in ("qwen3", "qwen3_moe", "olmoe"):
        if bias == "qkv":
            raise Unfit("q/k/v biases without an o bias")
        out["attention_bias"] = bool(bias)
    elif bias:
        raise Unfit("attention biases")
    if t == "olmoe":
        out["clip_qkv"] = _one([a.clip_qkv for a in attn], "clip_qkv")
    ffs = [f for _, f in pairs]
    dense = [f for f in ffs if f.kind == "mlp"]
    sparse = [f for f in ffs if f.kind == "moe"]
    if dense:
        if _one([(f.activation, f.hidden(d)) for f in dense], "mlp")[0] != "swiglu":
            raise Unfit("an mlp other than swiglu")
        out["intermediate_size"] = dense[0].hidden(d)
        mb = _one([f.bias for f in dense], "mlp bias")
        if t == "llama":
            out["mlp_bias"] = bool(mb)
        elif mb:
            raise Unfit("mlp biases")
    if sparse:
        e = sparse[0]
        _one([repr(s.canonical(d)) for s in sparse], "MoE settings")
        if e.activation != "swiglu" or e.router != "softmax":
            raise Unfit(f"a {e.router} router with {e.activation} experts")
        out["num_experts_per_tok"] = e.top_k
        key = "num_local_experts" if t == "mixtral" else "num_experts"
        out[key] = e.n_experts
        if t == "mixtral":
            if not e.renormalize:
                raise Unfit("Mixtral renormalises the top-k weights")
            out["intermediate_size"] = e.hidden(d)
        else:
            out["norm_topk_prob"] = bool(e.renormalize)
            if t == "olmoe":
                out["intermediate_size"] = e.hidden(d)
            else:
                out["moe_intermediate_size"] = e.hidden(d)
                out.setdefault("intermediate_size", e.hidden(d))
        if t == "qwen2_moe":
            if not (e.shared_experts == 1 and e.shared_expert_gate):
                raise Unfit("Qwen2-MoE has one gated shared expert")
            out["shared_expert_intermediate_size"] = e.shared_hidden(d)
        if t in ("qwen2_moe", "qwen3_moe"):
            out["decoder_sparse_step"] = 1
            out["mlp_only_layers"] = [i for i, f in enumerate(ffs) if f.kind == "mlp"]
    elif moe:
        raise Unfit("no MoE layer")
    return out


def hf_mamba(cfg, fam: "Family") -> dict:
    specs = _specs(cfg)
    if set(_kinds(cfg)) != {"mamba"}:
        raise Unfit(f"needs only mamba sublayers (the stack is {' '.join(_kinds(cfg))})")
    d = cfg.model.d_model
    m = specs[0]
    _one([repr(s.canonical(d)) for s in specs], "mamba settings")
    want = "rms_weightless" if fam.model_type == "falcon_mamba" else "none"
    if m.inner_norms != want:
        raise Unfit(f"inner_norms={m.inner_norms} ({fam.architecture} has {want})")
    di, r, n, w = m.dims(d)
    out = {**_common_model(cfg), "num_hidden_layers": len(specs), "state_size": n, "conv_kernel": w,
           "expand": m.expand, "intermediate_size": di, "time_step_rank": r, "use_bias": m.bias,
           "use_conv_bias": m.conv_bias, "layer_norm_epsilon": cfg.model.norm_eps, "hidden_act": "silu"}
    if want != "none":
        out["mixer_rms_eps"] = m.inner_norm_eps
    return out


def _periodic(flags: list[bool]) -> tuple[int, int] | None:
    """(period, offset) with flags[i] == (i % period == offset), the smallest period; None."""
    n = len(flags)
    for p in range(1, n + 1):
        for o in range(p):
            if all(flags[i] == (i % p == o) for i in range(n)):
                return p, o
    return None


def hf_jamba(cfg, fam: "Family") -> dict:
    d = cfg.model.d_model
    pairs = _pairs(cfg, ("mamba", "attention"), ("mlp", "moe"), "a mamba or attention sublayer then an mlp or moe")
    mix = [a for a, _ in pairs]
    ffs = [f for _, f in pairs]
    attn = [a for a in mix if a.kind == "attention"]
    mam = [a for a in mix if a.kind == "mamba"]
    out = {**_common_model(cfg), "num_hidden_layers": len(pairs), "rms_norm_eps": cfg.model.norm_eps,
           "hidden_act": "silu", "use_mamba_kernels": False}
    per = _periodic([a.kind == "attention" for a in mix])
    if per is None or not attn:
        raise Unfit("attention layers at a period and offset")
    out["attn_layer_period"], out["attn_layer_offset"] = per
    out.update(_attn_hf(attn, d, rope=False))
    if _one([a.bias for a in attn], "attention bias"):
        raise Unfit("attention biases")
    if any(a.window for a in attn) or any(a.qk_norm for a in attn):
        raise Unfit("a window or QK-norm")
    if mam:
        m = mam[0]
        _one([repr(s.canonical(d)) for s in mam], "mamba settings")
        if m.inner_norms != "rms":
            raise Unfit("Jamba's Mamba has learned inner norms (inner_norms: rms)")
        if m.inner_norm_eps != cfg.model.norm_eps:
            raise Unfit("inner_norm_eps differs from model.norm_eps")
        di, r, n, w = m.dims(d)
        out.update(mamba_d_state=n, mamba_d_conv=w, mamba_expand=m.expand, mamba_dt_rank=r,
                   mamba_conv_bias=m.conv_bias, mamba_proj_bias=m.bias)
    sparse = [f for f in ffs if f.kind == "moe"]
    dense = [f for f in ffs if f.kind == "mlp"]
    sizes = [f.hidden(d) for f in ffs]
    out["intermediate_size"] = _one(sizes, "feed-forward width")
    if dense and _one([(f.activation, f.bias) for f in dense], "mlp") != ("swiglu", False):
        raise Unfit("Jamba's MLP is swiglu without biases")
    if sparse:
        e = sparse[0]
        _one([repr(s.canonical(d)) for s in sparse], "MoE settings")
        if e.router != "softmax" or e.renormalize or e.shared_experts or e.activation != "swiglu":
            raise Unfit("Jamba's MoE is softmax-routed swiglu experts without renormalisation or shared experts")
        per = _periodic([f.kind == "moe" for f in ffs])
        if per is None:
            raise Unfit("MoE layers at a period and offset")
        out["expert_layer_period"], out["expert_layer_offset"] = per
        out["num_experts"], out["num_experts_per_tok"] = e.n_experts, e.top_k
    else:
        out["num_experts"], out["num_experts_per_tok"] = 1, 1
    return out


def _mamba2_hf(mam: list, d: int, prefix: str = "mamba_") -> dict:
    m = mam[0]
    _one([repr(s.canonical(d)) for s in mam], "mamba2 settings")
    if not m.rmsnorm or m.D_has_hdim:
        raise Unfit("the family's Mamba-2 has the gated RMSNorm and one D per head")
    di, h, p, g, n = m.dims(d)
    lim = m.dt_limit or [0.0, float("inf")]
    return {f"{prefix}n_heads": h, f"{prefix}d_head": p, f"{prefix}d_state": n, f"{prefix}n_groups": g,
            f"{prefix}d_conv": m.d_conv, f"{prefix}expand": m.expand, f"{prefix}chunk_size": m.chunk_size,
            f"{prefix}conv_bias": m.conv_bias, f"{prefix}proj_bias": m.bias, "time_step_limit": list(lim)}


def hf_bamba(cfg, fam: "Family") -> dict:
    d = cfg.model.d_model
    pairs = _pairs(cfg, ("mamba2", "attention"), ("mlp",), "a mamba2 or attention sublayer then an mlp")
    mix = [a for a, _ in pairs]
    attn = [a for a in mix if a.kind == "attention"]
    mam = [a for a in mix if a.kind == "mamba2"]
    ffs = [f for _, f in pairs]
    out = {**_common_model(cfg), "num_hidden_layers": len(pairs), "rms_norm_eps": cfg.model.norm_eps,
           "hidden_act": "silu", "attn_layer_indices": [i for i, a in enumerate(mix) if a.kind == "attention"]}
    if attn:
        out.update(_attn_hf(attn, d))
        out["attention_bias"] = bool(_one([a.bias for a in attn], "attention bias"))
        if out["attention_bias"] and attn[0].bias == "qkv":
            raise Unfit("q/k/v biases without an o bias")
    if mam:
        out.update(_mamba2_hf(mam, d))
        if mam[0].norm_eps != cfg.model.norm_eps:
            raise Unfit("the Mamba-2 norm_eps differs from model.norm_eps")
    act, ff, b = _one([(f.activation, f.hidden(d), f.bias) for f in ffs], "mlp")
    if act != "swiglu":
        raise Unfit("Bamba's MLP is swiglu")
    out.update(intermediate_size=ff, mlp_bias=bool(b))
    return out


def hf_nemotron_h(cfg, fam: "Family") -> dict:
    d = cfg.model.d_model
    chars = {"mamba2": "M", "attention": "*", "mlp": "-", "moe": "E"}
    kinds = _kinds(cfg)
    bad = sorted(set(kinds) - set(chars))
    if bad:
        raise Unfit(f"has no {', '.join(bad)} sublayers")
    specs = _specs(cfg)
    out = {**_common_model(cfg), "layer_norm_epsilon": cfg.model.norm_eps, "mlp_hidden_act": "relu2",
           "mamba_hidden_act": "silu", "hybrid_override_pattern": "".join(chars[k] for k in kinds),
           "num_hidden_layers": len(kinds)}
    types = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
    out["layers_block_type"] = [types[ch] for ch in out.pop("hybrid_override_pattern")]
    attn = [s for s in specs if s.kind == "attention"]
    mam = [s for s in specs if s.kind == "mamba2"]
    mlp = [s for s in specs if s.kind == "mlp"]
    moe = [s for s in specs if s.kind == "moe"]
    if attn:
        out.update(_attn_hf(attn, d, rope=False))
        if _one([a.bias for a in attn], "attention bias") or any(a.window or a.qk_norm for a in attn):
            raise Unfit("Nemotron-H's attention has no biases, window or QK-norm")
    if mam:
        m2 = _mamba2_hf(mam, d)
        out.update(mamba_num_heads=m2["mamba_n_heads"], mamba_head_dim=m2["mamba_d_head"],
                   ssm_state_size=m2["mamba_d_state"], n_groups=m2["mamba_n_groups"],
                   conv_kernel=m2["mamba_d_conv"], chunk_size=m2["mamba_chunk_size"],
                   use_conv_bias=m2["mamba_conv_bias"], use_bias=m2["mamba_proj_bias"],
                   time_step_limit=m2["time_step_limit"], expand=m2["mamba_expand"])
        if mam[0].norm_eps != cfg.model.norm_eps:
            raise Unfit("the Mamba-2 norm_eps differs from model.norm_eps")
    if mlp:
        act, ff, b = _one([(f.activation, f.hidden(d), f.bias) for f in mlp], "mlp")
        if act != "relu2":
            raise Unfit("Nemotron-H's MLP is relu2")
        out.update(intermediate_size=ff, mlp_bias=bool(b))
    if moe:
        e = moe[0]
        _one([repr(s.canonical(d)) for s in moe], "MoE settings")
        if e.router != "sigmoid" or e.activation != "relu2" or e.shared_experts > 1 or e.shared_expert_gate:
            raise Unfit("Nemotron-H's MoE is sigmoid-routed relu2 experts with at most one ungated shared expert")
        out.update(n_routed_experts=e.n_experts, num_experts_per_tok=e.top_k, moe_intermediate_size=e.hidden(d),
                   norm_topk_prob=bool(e.renormalize), routed_scaling_factor=e.routed_scale, n_group=1,
                   topk_group=1, n_shared_experts=e.shared_experts,
                   moe_shared_expert_intermediate_size=e.shared_hidden(d) if e.shared_experts else e.hidden(d))
    return out


def hf_granite(cfg, fam: "Family") -> dict:
    d = cfg.model.d_model
    m = cfg.model
    if m.norm != "rmsnorm":
        raise Unfit(f"model.norm is {m.norm}")
    pairs = _pairs(cfg, ("mamba2", "attention"), ("moe", "mlp"), "a mamba2 or attention sublayer then a moe or mlp")
    mix = [a for a, _ in pairs]
    ffs = [f for _, f in pairs]
    attn = [a for a in mix if a.kind == "attention"]
    mam = [a for a in mix if a.kind == "mamba2"]
    out = {"hidden_size": d, "vocab_size": int(m.vocab_size), "tie_word_embeddings": bool(m.tie_embeddings),
           "embedding_multiplier": m.embedding_multiplier, "residual_multiplier": m.residual_multiplier,
           "logits_scaling": m.logits_scaling, "num_hidden_layers": len(pairs), "rms_norm_eps": m.norm_eps,
           "hidden_act": "silu",
           "layer_types": ["full_attention" if a.kind == "attention" else "linear_attention" for a in mix]}
    if attn:
        rope = _one([a.rope_theta is not None for a in attn], "RoPE")
        out.update(_attn_hf(attn, d, rope=rope))
        out["position_embedding_type"] = "rope" if rope else None
        hd = attn[0].dims(d)[2]
        scale = _one([a.softmax_scale for a in attn], "softmax_scale")
        out["attention_multiplier"] = hd ** -0.5 if scale is None else scale
        b = _one([a.bias for a in attn], "attention bias")
        if b == "qkv" or any(a.window or a.qk_norm for a in attn):
            raise Unfit("GraniteMoeHybrid's attention has no window, QK-norm or q/k/v-only biases")
        out["attention_bias"] = bool(b)
    if mam:
        out.update(_mamba2_hf(mam, d))
        if mam[0].norm_eps != m.norm_eps:
            raise Unfit("the Mamba-2 norm_eps differs from model.norm_eps")
    kinds = {f.kind for f in ffs}
    if kinds == {"moe"}:
        e = ffs[0]
        _one([repr(s.canonical(d)) for s in ffs], "MoE settings")
        if (e.router != "softmax" or not e.renormalize or e.activation != "swiglu" or e.shared_experts != 1
                or e.shared_expert_gate):
            raise Unfit("GraniteMoeHybrid's MoE is softmax-routed, renormalised swiglu experts with one shared expert")
        out.update(num_local_experts=e.n_experts, num_experts_per_tok=e.top_k, intermediate_size=e.hidden(d),
                   shared_intermediate_size=e.shared_hidden(d))
    elif kinds == {"mlp"}:
        act, ff, b = _one([(f.activation, f.hidden(d), f.bias) for f in ffs], "mlp")
        if act != "swiglu" or b:
            raise Unfit("GraniteMoeHybrid's dense MLP is swiglu without biases")
        out.update(num_local_experts=0, shared_intermediate_size=ff, intermediate_size=ff)
    else:
        raise Unfit("every layer has experts, or none does")
    return out


# ----------------------------------------------------------------------------------------------
# the family table
# ----------------------------------------------------------------------------------------------
@dataclass
class Family:
    model_type: str
    architecture: str
    plan: Callable
    hf_config: Callable
    defaults: dict


_DENSE = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000.0,
          "attention_bias": False, "mlp_bias": False}
FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM", plan_decoder, hf_decoder, {**_DENSE}),
    Family("mistral", "MistralForCausalLM", plan_decoder, hf_decoder,
           {**_DENSE, "sliding_window": 4096, "num_key_value_heads": 8}),
    Family("qwen2", "Qwen2ForCausalLM", plan_decoder, hf_decoder,
           {**_DENSE, "sliding_window": 4096, "max_window_layers": 28, "use_sliding_window": False,
            "num_key_value_heads": 32}),
    Family("qwen3", "Qwen3ForCausalLM", plan_decoder, hf_decoder,
           {**_DENSE, "sliding_window": 4096, "max_window_layers": 28, "use_sliding_window": False,
            "head_dim": 128, "num_key_value_heads": 32}),
    Family("mixtral", "MixtralForCausalLM", plan_decoder, hf_decoder,
           {**_DENSE, "rms_norm_eps": 1e-5, "sliding_window": None, "num_key_value_heads": 8,
            "num_local_experts": 8, "num_experts_per_tok": 2}),
    Family("qwen2_moe", "Qwen2MoeForCausalLM", plan_decoder, hf_decoder,
           {**_DENSE, "sliding_window": 4096, "max_window_layers": 28, "use_sliding_window": False,
            "decoder_sparse_step": 1, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
            "num_experts_per_tok": 4, "num_experts": 60, "norm_topk_prob": False, "qkv_bias": True,
            "num_key_value_heads": 16}),
    Family("qwen3_moe", "Qwen3MoeForCausalLM", plan_decoder, hf_decoder,
           {**_DENSE, "sliding_window": 4096, "use_sliding_window": False, "decoder_sparse_step": 1,
            "moe_intermediate_size": 768, "num_experts_per_tok": 8, "num_experts": 128, "norm_topk_prob": False,
            "num_key_value_heads": 4}),
    Family("olmoe", "OlmoeForCausalLM", plan_decoder, hf_decoder,
           {**_DENSE, "rms_norm_eps": 1e-5, "num_experts_per_tok": 8, "num_experts": 64, "norm_topk_prob": False}),
    Family("mamba", "MambaForCausalLM", plan_mamba, hf_mamba,
           {"hidden_act": "silu", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True, "state_size": 16,
            "expand": 2, "conv_kernel": 4, "use_bias": False, "use_conv_bias": True, "time_step_rank": "auto"}),
    Family("falcon_mamba", "FalconMambaForCausalLM", plan_mamba, hf_mamba,
           {"hidden_act": "silu", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True, "state_size": 16,
            "expand": 2, "conv_kernel": 4, "use_bias": False, "use_conv_bias": True, "time_step_rank": "auto",
            "mixer_rms_eps": 1e-6}),
    Family("jamba", "JambaForCausalLM", plan_jamba, hf_jamba,
           {"hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "num_key_value_heads": 8,
            "num_experts_per_tok": 2, "num_experts": 16, "expert_layer_period": 2, "expert_layer_offset": 1,
            "attn_layer_period": 8, "attn_layer_offset": 4, "mamba_d_state": 16, "mamba_d_conv": 4,
            "mamba_expand": 2, "mamba_dt_rank": "auto", "mamba_conv_bias": True, "mamba_proj_bias": False}),
    Family("bamba", "BambaForCausalLM", plan_bamba, hf_bamba,
           {"hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "num_key_value_heads": 8,
            "mamba_n_heads": 128, "mamba_d_head": "auto", "mamba_n_groups": 1, "mamba_d_state": 256,
            "mamba_d_conv": 4, "mamba_expand": 2, "mamba_chunk_size": 256, "mamba_conv_bias": True,
            "mamba_proj_bias": False, "time_step_limit": [0.0, float("inf")], "attention_bias": False,
            "mlp_bias": False, "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    Family("nemotron_h", "NemotronHForCausalLM", plan_nemotron_h, hf_nemotron_h,
           {"tie_word_embeddings": False, "num_key_value_heads": 8, "head_dim": 128, "attention_bias": False,
            "mlp_hidden_act": "relu2", "mlp_bias": False, "ssm_state_size": 128, "mamba_num_heads": 128,
            "mamba_head_dim": 64, "mamba_hidden_act": "silu", "n_groups": 8, "conv_kernel": 4, "expand": 2,
            "time_step_limit": [0.0, float("inf")], "use_conv_bias": True, "chunk_size": 128, "use_bias": False,
            "n_routed_experts": 8, "n_shared_experts": 1, "moe_intermediate_size": 7688,
            "moe_shared_expert_intermediate_size": 7688, "num_experts_per_tok": 2, "routed_scaling_factor": 1.0,
            "n_group": 1, "topk_group": 1, "norm_topk_prob": True, "layer_norm_epsilon": 1e-5}),
    Family("granitemoehybrid", "GraniteMoeHybridForCausalLM", plan_granite, hf_granite,
           {"hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False,
            "rope_theta": 10000.0, "embedding_multiplier": 1.0, "logits_scaling": 1.0, "residual_multiplier": 1.0,
            "attention_multiplier": 1.0, "num_local_experts": 8, "num_experts_per_tok": 2,
            "shared_intermediate_size": 1024, "position_embedding_type": None, "mamba_n_heads": 128,
            "mamba_n_groups": 1, "mamba_d_state": 256, "mamba_d_head": "auto", "mamba_d_conv": 4,
            "mamba_expand": 2, "mamba_chunk_size": 256, "mamba_conv_bias": True, "mamba_proj_bias": False,
            "time_step_limit": [0.0, float("inf")]}),
)}

# the order export tries when no family is named (the first that fits wins)
EXPORT_ORDER = ("llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "mamba",
                "falcon_mamba", "jamba", "bamba", "granitemoehybrid", "nemotron_h")


def family_of(hf_config: dict, where: str = "config.json") -> Family:
    t = hf_config.get("model_type")
    archs = hf_config.get("architectures") or []
    if t not in FAMILIES:
        known = ", ".join(f.architecture for f in FAMILIES.values())
        raise HFUnsupported(f"{where}: unknown architecture (model_type {t!r}, architectures {archs}); "
                            f"hybridseq imports: {known}")
    fam = FAMILIES[t]
    for a in archs:
        if a != fam.architecture:
            raise HFUnsupported(f"{where}: architecture {a!r} (hybridseq imports {fam.architecture} for "
                                f"model_type {t!r}: the causal-LM head)")
    return fam


# ----------------------------------------------------------------------------------------------
# applying the rules
# ----------------------------------------------------------------------------------------------
def _pick(rule: Rule, available) -> Rule | None:
    r = rule
    while r is not None:
        if all(k in available for k in r.theirs):
            return r
        r = r.alt
    return None


def convert_to_ours(rules: list[Rule], tensors: dict[str, torch.Tensor], where: str,
                    skip=()) -> dict[str, torch.Tensor]:
    """Apply every rule to the checkpoint's ``tensors``; every checkpoint tensor must be read."""
    out, used = {}, set()
    missing = []
    for rule in rules:
        r = _pick(rule, tensors)
        if r is None:
            absent = [k for k in rule.theirs if k not in tensors]
            missing.append(absent[0] + (f" (or {rule.alt.theirs[0]})" if rule.alt else ""))
            continue
        out[rule.ours] = r.to_ours([tensors[k] for k in r.theirs])
        used.update(r.theirs)
    if missing:
        raise HFError(f"{where}: tensors missing: {', '.join(missing[:6])}"
                      + (f" and {len(missing) - 6} more" if len(missing) > 6 else ""))
    left = sorted(k for k in tensors if k not in used and k not in skip)
    if left:
        raise HFError(f"{where}: tensors no hybridseq weight takes: {', '.join(left[:6])}"
                      + (f" and {len(left) - 6} more" if len(left) > 6 else ""))
    return out


def convert_to_theirs(rules: list[Rule], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, used = {}, set()
    for rule in rules:
        if rule.ours not in state:
            raise HybridSeqError(f"export: the model has no tensor {rule.ours!r}")
        for k, t in zip(rule.theirs, rule.to_theirs(state[rule.ours])):
            out[k] = t
        used.add(rule.ours)
    left = sorted(k for k in state if k not in used)
    if left:
        raise HybridSeqError(f"export: tensors with no place in the checkpoint: {', '.join(left[:6])}")
    return out


# ----------------------------------------------------------------------------------------------
# entry points
# ----------------------------------------------------------------------------------------------
def plan_checkpoint(hf_config: dict, where: str = "config.json", pad_vocab_multiple: int = 1):
    """(family, plan, hybridseq config dict) of a checkpoint config."""
    fam = family_of(hf_config, where)
    c = Config(hf_config, fam.defaults, fam.model_type)
    plan = fam.plan(c, fam)
    plan.model["pad_vocab_multiple"] = int(pad_vocab_multiple)
    return fam, plan, plan.config(str(hf_config.get("_name_or_path") or fam.model_type).split("/")[-1] or fam.model_type)


def _dtype_of(tensors: dict, key: str) -> torch.dtype:
    t = tensors.get(key)
    if t is None:
        t = next(iter(tensors.values()))
    return t.dtype if t.dtype.is_floating_point else torch.float32


def _empty_model(cfg, dtype: torch.dtype):
    """A ``HybridLM`` of ``cfg`` whose parameters are allocated in ``dtype`` (float32-kept ones in
    float32) but not initialised: built on the meta device, so that importing a large checkpoint
    never holds a float32 copy of the model beside it. Non-persistent buffers and tensor
    attributes start at zero."""
    from ..model import HybridLM

    with torch.device("meta"):
        model = HybridLM(cfg)
    # the parameter tags (_keep_fp32, _no_weight_decay, _no_reinit) live on the Parameter
    # objects, which leaving the meta device replaces: carry them over
    tags = {n: {k: v for k, v in vars(p).items() if k.startswith("_")} for n, p in model.named_parameters()}
    if dtype != torch.float32:
        model.to(dtype)
    model.to_empty(device="cpu")
    for n, p in model.named_parameters():
        for k, v in tags.get(n, {}).items():
            setattr(p, k, v)
        if getattr(p, "_keep_fp32", False) and p.dtype != torch.float32:
            p.data = p.data.float()
    with torch.no_grad():
        for mod in model.modules():
            for name, buf in mod.named_buffers(recurse=False):
                buf.zero_()
            for name, value in list(vars(mod).items()):
                if isinstance(value, torch.Tensor) and value.is_meta:
                    setattr(mod, name, torch.zeros(value.shape, dtype=value.dtype))
    return model


def from_hf(path: str | os.PathLike, *, dtype=None, pad_vocab_multiple: int = 1, device=None):
    """Read a local transformers checkpoint folder (``config.json`` and ``model.safetensors`` or
    shards) into ``(HybridLM, HybridConfig)``. ``dtype``: the model's dtype (None: the dtype of
    the checkpoint's embedding); float32-tagged parameters stay float32. ``pad_vocab_multiple``:
    the embedding (and head) rows rounded up to a multiple of it, the new rows zero."""
    from ..config import load_config
    from .hf_io import DTYPES, read_config, read_weights

    hf = read_config(path)
    where = str(Path(path) / "config.json")
    fam, plan, cfg_dict = plan_checkpoint(hf, where, pad_vocab_multiple)
    cfg_dict["name"] = Path(path).resolve().name or cfg_dict["name"]
    cfg = load_config(cfg_dict)
    tensors = read_weights(path)
    if isinstance(dtype, str):
        if dtype not in DTYPES and dtype != "auto":
            raise HybridSeqError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
        dtype = None if dtype == "auto" else DTYPES[dtype]
    dtype = dtype or _dtype_of(tensors, plan.embed)
    model = _empty_model(cfg, dtype)
    vocab = int(cfg.model.vocab_size)
    tied = bool(cfg.model.tie_embeddings)
    rules = plan.rules(vocab, model.vocab_size, tied)
    skip = set(plan.skip)
    if tied and plan.lm_head in tensors:
        # a tied head saved anyway must be the embedding itself
        emb = tensors.get(plan.embed)
        if emb is None or not torch.equal(tensors[plan.lm_head], emb):
            raise HFError(f"{where}: tie_word_embeddings is true but {plan.lm_head} differs from {plan.embed}")
        skip.add(plan.lm_head)
    state = convert_to_ours(rules, tensors, str(path), skip)
    del tensors
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (the layout gives {tuple(own[k].shape)})"
             for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise HFError(f"{path}: tensor shapes do not match config.json: {', '.join(wrong[:4])}")
    missing = sorted(set(own) - set(state))
    if missing:
        raise HFError(f"{path}: no checkpoint tensor for {', '.join(missing[:6])}")
    model.load_state_dict(state, strict=True)
    if device is not None:
        model.to(device)
    return model.eval(), model.cfg


def export_config(cfg, family: str | None = None, *, pad_vocab_multiple: int | None = None):
    """(family, checkpoint config dict, plan) for a hybridseq config; ``HFUnsupported`` naming
    why no family (or not ``family``) fits."""
    from ..config import config_hash, load_config
    from ..config.derived import config_payload, payload_differences

    names = [family] if family else list(EXPORT_ORDER)
    if family and family not in FAMILIES:
        raise HybridSeqError(f"unknown family {family!r} (one of: {', '.join(FAMILIES)})")
    reasons = []
    pad = int(cfg.model.pad_vocab_multiple if pad_vocab_multiple is None else pad_vocab_multiple)
    want = config_hash(cfg)
    for name in names:
        fam = FAMILIES[name]
        try:
            hf = fam.hf_config(cfg, fam)
        except Unfit as e:
            reasons.append(f"{fam.architecture}: {e}")
            continue
        hf = {"model_type": fam.model_type, "architectures": [fam.architecture], **hf}
        try:
            _, plan, back = plan_checkpoint(hf, f"{fam.architecture} config", pad)
            back_cfg = load_config(back)
        except HybridSeqError as e:
            reasons.append(f"{fam.architecture}: {e}")
            continue
        if config_hash(back_cfg) != want:
            diffs = payload_differences(config_payload(cfg), config_payload(back_cfg))
            reasons.append(f"{fam.architecture}: its config would differ ({'; '.join(diffs[:3])})")
            continue
        return fam, hf, plan
    if family:
        raise HFUnsupported(f"this layout does not fit {FAMILIES[family].architecture}: {reasons[0].split(': ', 1)[1]}")
    raise HFUnsupported("no transformers family fits this layout: " + "; ".join(reasons))


def to_hf(model, out_dir: str | os.PathLike, *, family: str | None = None, dtype=None,
          tokenizer_from: str | os.PathLike | None = None) -> Path:
    """Write ``model`` (a ``HybridLM``) as a transformers checkpoint in ``out_dir``
    (``config.json`` + ``model.safetensors``, loadable by ``AutoModelForCausalLM.from_pretrained``),
    in the first family of ``EXPORT_ORDER`` that fits the layout (or ``family``). ``dtype``: the
    tensors' dtype (None: the model's; float32-tagged parameters keep float32 unless a dtype is
    given). ``tokenizer_from``: a folder whose tokenizer files are copied beside. Raises
    ``HFUnsupported`` naming why the layout fits no family."""
    from .hf_io import DTYPES, write_checkpoint

    cfg = model.cfg
    fam, hf, plan = export_config(cfg, family)
    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else DTYPES[dtype]
    main = model.embed.weight.dtype
    hf["dtype"] = str(dtype or main).replace("torch.", "")
    hf["torch_dtype"] = hf["dtype"]
    rules = plan.rules(model.vocab_size_unpadded, model.vocab_size, bool(cfg.model.tie_embeddings))
    state = {k: v for k, v in model.state_dict().items()}
    tensors = convert_to_theirs(rules, state)
    if dtype is not None:
        tensors = {k: (v.to(dtype) if v.dtype.is_floating_point else v) for k, v in tensors.items()}
    return write_checkpoint(out_dir, hf, tensors, copy_from=tokenizer_from)


__all__ = ["EXPORT_ORDER", "FAMILIES", "HFError", "HFUnsupported", "export_config", "from_hf", "plan_checkpoint",
           "to_hf"]

"""A handwritten Qwen2 (the architecture of Qwen2.5-Math-1.5B/7B) with a native layer-skip mask,
HF-compatible safetensors checkpoint I/O and a batched KV-cache sampler.

    logits = model(input_ids, skip_mask=None, attention_mask=None, logits_from=0)   # [B, T - logits_from, V]
    out = model.generate(prompts, max_new_tokens=256, temperature=1.0, skip_mask=mask, eos_token_ids=(...))

The nested behaviour model of Nested-ReFT (spec §2) is the same module called with `skip_mask`: a host-side
sequence of N bools, True = that decoder layer is the identity on the residual stream. The mask never goes to
the device, so there is no per-layer sync; the KV cache of a generate() call holds only the active layers.
On CPU, generate()'s one-token steps use the active weights with q|k|v and gate|up fused and the large matrices
prepacked (DecodeWeights, Qwen2.pack_for_decode): fewer calls, and skinny matmuls closer to memory bandwidth.

Architecture (pre-norm decoder, per layer l):
    h = x + o_proj(Attn(RoPE(q_proj(RMSNorm(x))), RoPE(k_proj(.)), v_proj(.)))    q/k/v with bias, GQA
    x' = h + down_proj(silu(gate_proj(RMSNorm(h))) * up_proj(RMSNorm(h)))         SwiGLU, no bias
    RMSNorm(x) = w * (x / sqrt(mean(x^2) + eps))  computed in fp32, cast back before the weight multiply
    logits = lm_head(RMSNorm(x_N))    lm_head tied to embed_tokens when tie_word_embeddings
"""
from __future__ import annotations

import json
import math
import numbers
import operator
import os
import shutil
import tempfile
import weakref
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.optim.optimizer import register_optimizer_step_post_hook

# ----------------------------------------------------------------------------------------------------------
# config


_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16, "fp16": torch.float16}


def _as_dtype(dtype) -> torch.dtype:
    """torch.dtype or its name ("bfloat16", "float32", ...) -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype={dtype!r}: expected one of {sorted(_DTYPES)} or a torch.dtype")


def parse_device(spec: str, source: str = "device") -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' that exists on this machine -> torch.device; else ValueError naming `source`."""
    try:
        dev = torch.device(spec)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{source} = {spec!r}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda" and not (torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()):
        raise ValueError(f"{source} = {spec!r}: no such CUDA device on this machine "
                         f"({torch.cuda.device_count()} visible)")
    return dev


@dataclass
class Qwen2Config:
    """The fields of a Hugging Face Qwen2 config.json that this implementation uses."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    torch_dtype: str = "float32"
    bos_token_id: int | None = None            # carried from config.json to config.json (transformers reads
    eos_token_id: int | list[int] | None = None   # eos_token_id where no generation_config.json says otherwise)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self):
        self.validate()

    def validate(self, source: str = "Qwen2Config"):
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{source}: {k}={v!r}, expected a positive integer")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"{source}: hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 2:
            raise ValueError(f"{source}: head_dim={self.head_dim} must be even for RoPE")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{source}: num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        for k in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:   # NaN, inf fail
                raise ValueError(f"{source}: {k}={v!r}, expected a positive finite number")
        for k in ("bos_token_id", "eos_token_id"):
            v = getattr(self, k)
            ids = v if isinstance(v, list) and v and k == "eos_token_id" else [v]
            if v is not None and any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
                raise ValueError(f"{source}: {k}={v!r}, expected a token id (an integer >= 0)"
                                 + (" or a list of them" if k == "eos_token_id" else ""))
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"{source}: tie_word_embeddings={self.tie_word_embeddings!r}, expected true/false")
        try:
            _as_dtype(self.torch_dtype)
        except ValueError:
            raise ValueError(f"{source}: torch_dtype={self.torch_dtype!r}, expected one of {sorted(_DTYPES)}") from None

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "Qwen2Config":
        """Build from the content of an HF config.json (transformers 4.x or 5.x layout); unknown keys are
        ignored. A missing required key, a model_type other than "qwen2" or an unsupported feature (sliding
        window, rope scaling, a non-silu activation) raises ValueError naming `source` and the key."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if "model_type" in d and d["model_type"] != "qwen2":
            raise ValueError(f"{source}: model_type={d['model_type']!r}, expected 'qwen2'")
        kw = {}
        for f in fields(cls):
            if f.name in d:
                kw[f.name] = d[f.name]
        rope = d.get("rope_parameters") or {}          # transformers 5 layout
        if "rope_theta" not in kw and "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        if "torch_dtype" not in kw and d.get("dtype") is not None:
            kw["torch_dtype"] = d["dtype"]
        if kw.get("torch_dtype") is None:
            kw.pop("torch_dtype", None)
        for k in (f.name for f in fields(cls) if f.default is MISSING):
            if k not in kw:
                raise ValueError(f"{source}: missing required key {k!r}")
        cfg = cls.__new__(cls)
        for f in fields(cls):
            setattr(cfg, f.name, kw.get(f.name, f.default))
        cfg.torch_dtype = str(cfg.torch_dtype).removeprefix("torch.")
        cfg.validate(source)
        # features of the HF Qwen2 family that this implementation does not have
        for key, ok in (("hidden_act", lambda v: v == "silu"),
                        ("use_sliding_window", lambda v: not v),
                        ("rope_scaling", lambda v: v is None or isinstance(v, dict)
                         and v.get("rope_type", v.get("type")) == "default"),
                        ("rope_parameters", lambda v: v is None or isinstance(v, dict)
                         and v.get("rope_type", "default") == "default"),
                        ("head_dim", lambda v: v is None or v == cfg.head_dim)):
            if key in d and not ok(d[key]):
                raise ValueError(f"{source}: {key}={d[key]!r} is not supported by this Qwen2 implementation")
        return cfg

    @classmethod
    def from_json(cls, path) -> "Qwen2Config":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config file not found")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}), expected a JSON config") from None
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict:
        """HF-compatible config.json content (read by transformers 4.x and 5.x, and vLLM)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for k in ("bos_token_id", "eos_token_id"):
            if d[k] is None:
                del d[k]
        d.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu",
                 rope_scaling=None, rope_parameters={"rope_theta": self.rope_theta, "rope_type": "default"},
                 use_sliding_window=False, sliding_window=None, max_window_layers=self.num_hidden_layers,
                 attention_dropout=0.0, use_cache=True, initializer_range=0.02)
        return d


# ----------------------------------------------------------------------------------------------------------
# modules (parameter names follow the HF layout so checkpoints load with no renaming)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):                                               # [..., D]
        # x / sqrt(mean(x^2) + eps) in fp32 (F.rms_norm upcasts bf16/fp16), cast back to x's dtype, then the gain
        if x.dtype == self.weight.dtype == torch.float32:               # the same, in one call
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return F.rms_norm(x, self.weight.shape, eps=self.eps) * self.weight


def rope_cos_sin(positions, inv_freq, dtype):
    """positions [...] long -> cos, sin [..., 1, hd] (the 1 broadcasts over heads) with angle(p, i) =
    p * theta^(-2i/hd) for both halves; the sin of the first half is negated so that
    RoPE(x) = x * cos + roll(x, hd/2) * sin equals the usual rotate-half form x * cos + cat(-x2, x1) * sin
    exactly (a sign flip is exact in floating point)."""
    freqs = positions[..., None].float() * inv_freq.float()            # [..., hd/2] fp32
    cos, sin = freqs.cos(), freqs.sin()
    cos, sin = torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)  # [..., hd]
    return cos.to(dtype)[..., None, :], sin.to(dtype)[..., None, :]


def apply_rope(x, cos, sin):                                            # x [B, T, heads, hd], cos/sin [B, T, 1, hd]
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


def masked_attention(q, k, v, mask, repeat_kv=None):
    """SDPA of q [B, H, T, hd] over k, v [B, Hkv, S, hd] (GQA: query head h reads kv head h // (H / Hkv)) with a
    mask [B or 1, 1, T, S] (bool, True = attend, or additive float). repeat_kv (None: off the CPU) repeats K/V per
    query head instead of enable_gqa: on CUDA enable_gqa with an attn_mask runs only in the math kernel, which
    materialises the [B, H, T, S] scores in fp32 (the training forward always has a mask: ~0.7 GB a layer held for the
    backward at 16 rows of 768 tokens, H = 12), while the memory-efficient kernel takes repeated K/V and a mask."""
    G = q.shape[1] // k.shape[1]
    if G > 1 and (q.device.type != "cpu" if repeat_kv is None else repeat_kv):
        k, v, G = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), 1       # what enable_gqa means
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=G > 1)


class Attention(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        D, H, Hkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.H, self.Hkv, self.hd = H, Hkv, hd
        self.q_proj = nn.Linear(D, H * hd, bias=True)
        self.k_proj = nn.Linear(D, Hkv * hd, bias=True)
        self.v_proj = nn.Linear(D, Hkv * hd, bias=True)
        self.o_proj = nn.Linear(H * hd, D, bias=False)

    def forward(self, x, cos, sin, mask, kv=None, start=0, w=None, residual=None):
        """-> [residual +] attention(x). x, residual (None: none added) [B, T, D]; cos/sin [B, T, 1, hd] (or
        [T, 1, hd]); mask: None (plain causal), or [B, 1, T, S] bool (True = attend) or float (added to the scores:
        0 / -inf); kv: None or this layer's cache (k, v) each [B, Hkv, S_max, hd], written at columns [start, start+T);
        w: None (use the parameters) or this layer's DecodeWeights (the CPU decode step)."""
        B, T, _ = x.shape
        H, Hkv, hd = self.H, self.Hkv, self.hd
        if w is None:
            q = apply_rope(self.q_proj(x).view(B, T, H, hd), cos, sin)           # [B, T, H, hd]
            k = apply_rope(self.k_proj(x).view(B, T, Hkv, hd), cos, sin)         # [B, T, Hkv, hd]
            v = self.v_proj(x).view(B, T, Hkv, hd)                               # [B, T, Hkv, hd]
        else:                         # one matmul for q|k|v, RoPE on the H + Hkv heads of q|k at once
            qkv = w.qkv(x).view(B, T, H + 2 * Hkv, hd)                           # [B, T, H+2Hkv, hd]
            q, k = apply_rope(qkv[:, :, :H + Hkv], cos, sin).split((H, Hkv), 2)
            v = qkv[:, :, H + Hkv:]
        k, v = k.transpose(1, 2), v.transpose(1, 2)                              # [B, Hkv, T, hd]
        if kv is not None:
            kc, vc = kv
            kc[:, :, start:start + T] = k
            vc[:, :, start:start + T] = v
            k, v = kc[:, :, :start + T], vc[:, :, :start + T]                    # [B, Hkv, S, hd] views
        G = H // Hkv
        if T == 1:
            # decode: the G query heads of a kv head on the query axis, no repeated K/V in memory
            y = F.scaled_dot_product_attention(q.view(B, Hkv, G, hd), k, v, attn_mask=mask)  # [B, Hkv, G, hd]
            y = y.view(B, 1, H * hd)
        else:
            q = q.transpose(1, 2)                                                # [B, H, T, hd]
            if mask is None and start == 0:                                      # no padding: plain causal
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=G > 1)
            else:
                if mask is None:                                                 # chunk after cached columns
                    mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
                y = masked_attention(q, k, v, mask)
            y = y.transpose(1, 2).reshape(B, T, H * hd)                          # [B, T, H*hd]
        if w is not None:
            return w.o(y, residual)
        y = self.o_proj(y)                                                       # [B, T, D]
        return y if residual is None else residual + y


class MLP(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x, w=None, residual=None):        # [residual +] MLP(x), [B, T, D]; w: see Attention
        if w is None:
            y = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
            return y if residual is None else residual + y
        gate, up = w.gate_up(x).chunk(2, -1)                            # one matmul instead of 2
        return w.down(F.silu(gate) * up, residual)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv=None, start=0, w=None):
        x = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, start, w, residual=x)
        return self.mlp(self.post_attention_layernorm(x), w, residual=x)


class Backbone(nn.Module):
    """Holds the `model.*` parameters of the HF layout."""

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


PACK_MIN_NEW_TOKENS = 16     # generate() packs the decode weights from here on: packing costs ~5-15 steps
PACK_MIN_BYTES = 2**20       # DecodeLinear prepacks a (fused) matrix from this size on; a smaller one, read from
                             # the caches, is faster through torch.mm than through oneDNN's per-call setup
_PACKED = weakref.WeakKeyDictionary()     # model -> its last packing (pack_for_decode); not an attribute, so
                                          # deepcopy / state_dict / pickle of the model never see oneDNN tensors
# any optimizer step drops every packing: a fused optimizer writes the weights without bumping their version counter
register_optimizer_step_post_hook(lambda *_: _PACKED.clear())


def decode_packing(model: nn.Module) -> dict | None:
    """The model's current decode packing (pack_for_decode): {"lm_head": DecodeLinear, "layers": {i: DecodeWeights},
    ...}, or None (none made, or dropped by an optimizer step or drop_decode_packing)."""
    return _PACKED.get(model)


def drop_decode_packing(model: nn.Module) -> None:
    """Forget the model's decode packing: the next generate() packs again (benchmarks time a real packing)."""
    _PACKED.pop(model, None)


def _weights_key(model: nn.Module) -> tuple:
    """What pack_for_decode's reuse checks: per parameter its storage and in-place version counter (bumped by writes
    through autograd: optimizer steps, load_state_dict, p.add_), plus 16 of its values spread over it, which also
    catch writes that bypass the counter (p.data.copy_(...), as weight syncing and EMA code do) when they change one
    of those 16 values: a write through p.data to a few entries only (p.data[rows] = ...) can miss them all and
    leave the packing stale; call drop_decode_packing(model) after such a write."""
    ps = list(model.parameters())
    sample = torch.cat([p.detach().reshape(-1)[::max(1, p.numel() // 16)][:16].float() for p in ps])
    return tuple((p.data_ptr(), p._version, p.dtype) for p in ps), sample


def pack_rows(batch: int) -> int:
    """The row count a batch's decode weights are prepacked for. oneDNN picks the packed layout for a row count, but
    it is valid for any: packed for 16, a matmul of 4-64 rows is as fast as packed for its own count (0.5B shape,
    fp32 and bf16), and one row 8-10 % slower than packed for 1, which is 40-70 % slower on 4 rows or more. So a
    packing for 16 serves every batch, and one made for a lone row (no packing yet) serves only lone rows."""
    return 1 if batch == 1 else 16


def native_bf16_matmul() -> bool:
    """Does this CPU multiply bf16 in hardware (AMX or AVX512-BF16, as oneDNN sees it)? Without, a bf16 matmul is
    emulated and several times slower than an fp32 one (bench/bench_sampler.py, README)."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


class DecodeLinear:
    """x [B, 1, in] -> x W^T + b for the decode step on CPU, W = the weights of `linears` (same input) concatenated
    along the output axis (one matmul instead of several). From PACK_MIN_BYTES on, W is prepacked ONCE into
    oneDNN's blocked layout for `rows` input rows (pack_rows). Why: with a few rows F.linear reads a large weight at
    ~11-16 GB/s (Intel Xeon with AMX; fp32: MKL's small-M sgemm, bf16: oneDNN on an unpacked weight) and the prepacked
    matmul at ~25-31 GB/s, near the memory bandwidth. A smaller matrix is kept transposed, W^T [in, out] contiguous,
    and multiplied by torch.mm / addmm: lower fixed cost per call than oneDNN's, and MKL's fastest layout for a few
    rows (1.2-2.5x F.linear's [out, in] at 16 rows; bench/bench_sampler.py --sections k, README).
    dtype: the model's compute dtype (x, W and the output are rounded to it, as autocast's F.linear does);
    compute: the dtype the matmul runs in, dtype or float32. A bf16 matmul on a CPU without bf16 hardware runs in
    fp32 on the bf16 values (exact: a product of two bf16 numbers fits in fp32; the sum accumulates in fp32 as in
    a bf16 matmul), its output rounded to bf16."""

    def __init__(self, linears, dtype, rows: int, compute=None):
        self.dtype, self.compute = dtype, compute or dtype
        w = torch.cat([lin.weight for lin in linears]) if len(linears) > 1 else linears[0].weight
        w = w.to(dtype).to(self.compute)                                                  # [out, in]
        self.packed = w.numel() * self.compute.itemsize >= PACK_MIN_BYTES
        self.w = torch.ops.mkldnn._reorder_linear_weight(w, rows) if self.packed else w.t().contiguous()
        b = None if linears[0].bias is None else torch.cat([lin.bias for lin in linears])
        self.b = None if b is None else b.to(dtype).to(self.compute)

    def __call__(self, x, residual=None):           # [residual +] x W^T + b, in self.dtype; x [B, T, in]
        if x.dtype != self.dtype or self.compute != self.dtype:
            x = x.to(self.dtype).to(self.compute)
        if self.packed and residual is not None and residual.dtype == self.dtype == self.compute == torch.float32:
            # the residual add fused into the matmul (a oneDNN post-op): bit-identical in fp32; not in bf16, where
            # it would skip the rounding of x W^T before the add (HF rounds first)
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.w, self.b, "add")
        if self.packed:
            y = torch.ops.mkldnn._linear_pointwise(x, self.w, self.b, "none", [], "")
        else:
            x2 = x.reshape(-1, x.shape[-1])                                               # [B*T, in]
            y = torch.mm(x2, self.w) if self.b is None else torch.addmm(self.b, x2, self.w)
            y = y.view(*x.shape[:-1], y.shape[-1])                                        # [B, T, out]
        if y.dtype != self.dtype:
            y = y.to(self.dtype)
        return y if residual is None else residual + y


class DecodeWeights:
    """One decoder layer's matrices for the CPU decode step: q|k|v and gate|up fused (one matmul each instead of
    3 and 2), the large ones prepacked (DecodeLinear). Kept by pack_for_decode for later calls until the weights
    change (never parameters: the checkpoint layout stays HF)."""

    def __init__(self, layer: DecoderLayer, dtype, rows: int, compute=None):
        a, m = layer.self_attn, layer.mlp
        self.qkv = DecodeLinear((a.q_proj, a.k_proj, a.v_proj), dtype, rows, compute)
        self.o = DecodeLinear((a.o_proj,), dtype, rows, compute)
        self.gate_up = DecodeLinear((m.gate_proj, m.up_proj), dtype, rows, compute)
        self.down = DecodeLinear((m.down_proj,), dtype, rows, compute)


class KVCache:
    """Preallocated K/V for the ACTIVE layers only: k, v [L_active, B, Hkv, S_max, hd].
    `mask` [B, S_max] marks real key columns (False = left padding) and `bias` [B, S_max] is the same as an
    additive attention mask (0 / -inf, cache dtype): the decode step's mask is a view of it, no conversion per
    layer; `next_pos` [B] is each row's next RoPE position; `cos`, `sin` [S_max, 1, hd] the RoPE table of
    positions 0..S_max-1 (a position never exceeds its column); `length` (host int) is the number of columns
    written; `active` the layer indices it serves. `weights` (DecodeWeights per active layer) and `lm_head`
    (DecodeLinear): set by Qwen2.pack_for_decode, used by one-token steps (the LM head by any cached call that
    wants one position per row, as generate()'s prefill does); None = the parameters."""

    def __init__(self, cfg: Qwen2Config, active: tuple[int, ...], batch: int, max_len: int, dtype, device,
                 rope: tuple[torch.Tensor, torch.Tensor]):
        shape = (len(active), batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.mask = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.bias = torch.zeros(batch, max_len, dtype=dtype, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.cos, self.sin = rope
        self.has_padding = False                                        # host flag: any False in mask?
        self.active, self.length, self.max_len = active, 0, max_len
        self.weights, self.lm_head = None, None

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def padded_causal_mask(key_valid, T: int, start: int):
    """key_valid [B, S] bool (False = padding), queries at columns start..start+T-1 of S = start + T keys ->
    [B, 1, T, S] bool, True = attend: causal and not padding. A padding query also attends to itself, so no
    softmax row is empty (its output is never used)."""
    S = key_valid.shape[1]
    causal = torch.ones(T, S, dtype=torch.bool, device=key_valid.device).tril(start)   # key <= query
    mask = causal & key_valid[:, None, :]                                              # [B, T, S]
    mask[:, :, start:] |= torch.eye(T, dtype=torch.bool, device=key_valid.device)
    return mask[:, None]


@dataclass
class GenerateOutput:
    tokens: torch.Tensor          # [B, Tn] long, pad_token_id after EOS
    mask: torch.Tensor            # [B, Tn] bool, True up to and including EOS
    logprobs: torch.Tensor        # [B, Tn] float32, log-prob of each token under the distribution it was drawn from
    prompt_tokens: torch.Tensor   # [B, Tp] long, left-padded with pad_token_id
    prompt_mask: torch.Tensor     # [B, Tp] bool


# ----------------------------------------------------------------------------------------------------------
# logit processing: THE single place (sampler and teacher-forced recompute both use it)


def process_logits(logits, temperature=1.0, top_p=1.0, valid_vocab_size=None, banned_ids=None):
    """logits [..., V] -> log-probs [..., V] float32 of the distribution the sampler draws from:
    ids >= valid_vocab_size and `banned_ids` (1-D long tensor, e.g. EOS before min_new_tokens) get -inf,
    then logits / temperature (temperature 0 = greedy: the log-probs are those of the temperature-1
    distribution), then top-p: keep the smallest set of most likely ids whose mass reaches top_p, renormalise.
    The arguments are not checked here (the sampler calls it every step): its callers check them once with
    check_logit_args, as code calling it directly should (top_p = 0 gives NaN, valid_vocab_size = -1 masks an id)."""
    x = logits.float()
    if valid_vocab_size is not None and valid_vocab_size < x.shape[-1]:
        x = x.clone()
        x[..., valid_vocab_size:] = float("-inf")
    if banned_ids is not None:
        x = x.index_fill(-1, banned_ids, float("-inf"))
    if temperature > 0 and temperature != 1.0:
        x = x / temperature
    logp = torch.log_softmax(x, dim=-1)
    if top_p < 1.0:
        sorted_logp, idx = logp.sort(dim=-1, descending=True)
        before = sorted_logp.exp().cumsum(-1) - sorted_logp.exp()      # mass strictly before each id
        drop = before >= top_p                                          # the first id is always kept
        logp = torch.log_softmax(x.masked_fill(drop.scatter(-1, idx, drop), float("-inf")), dim=-1)
    return logp


def logprobs_from_logits(logits, tokens, temperature=1.0, top_p=1.0, valid_vocab_size=None,
                         eos_token_ids=(), min_new_tokens=0):
    """logits [B, T, V] (position t predicts tokens[:, t]), tokens [B, T] -> [B, T] float32 log-probs under
    `process_logits`, exactly what generate() records. To reproduce a run with min_new_tokens > 0 pass the
    same eos_token_ids/min_new_tokens (EOS is banned at completion positions t < min_new_tokens)."""
    if logits.dim() < 2 or tokens.shape != logits.shape[:-1]:      # [B, T - 1] tokens gathered T - 1 positions
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)}: "
                         f"expected [B, T, V] and [B, T]")
    check_logit_args(logits.shape[-1], temperature, top_p, valid_vocab_size, eos_token_ids, min_new_tokens)
    T = logits.shape[-2]
    m = min(min_new_tokens, T) if len(eos_token_ids) else 0                # positions t < m: EOS banned
    # each position's log-softmax once: fixed-length rollouts (m = T) scored every position twice, and the unbanned
    # pass, overwritten, still held its [T, V] fp32 output for the backward
    parts = []
    if m > 0:
        banned = torch.as_tensor(list(eos_token_ids), dtype=torch.long, device=logits.device)
        head = process_logits(logits[..., :m, :], temperature, top_p, valid_vocab_size, banned)
        parts.append(head.gather(-1, tokens[..., :m, None]).squeeze(-1))
    if m < T or not parts:
        tail = process_logits(logits[..., m:, :], temperature, top_p, valid_vocab_size)
        parts.append(tail.gather(-1, tokens[..., m:, None]).squeeze(-1))
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


def sample_from_logprobs(logp, temperature, generator=None):
    """logp [B, V] -> token ids [B]: argmax when temperature == 0, else a draw from exp(logp)."""
    if temperature == 0:
        return logp.max(-1).indices        # = argmax (the first maximum), ~3x faster than argmax on CPU
    return torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------
# the model


def check_generate_args(prompts, vocab_size, max_new_tokens, min_new_tokens, temperature, top_p, eos_token_ids,
                        pad_token_id, valid_vocab_size) -> None:
    """generate()'s arguments, each checked with an error naming it (TypeError / ValueError)."""
    V = vocab_size
    if not isinstance(prompts, (list, tuple)) or not prompts or any(
            isinstance(p, (str, bytes)) or not hasattr(p, "__len__") or len(p) == 0 for p in prompts):  # [5, 17, 3]:
        raise ValueError("prompts: expected a non-empty list of non-empty token-id lists")         # len() of an int
    for name, n in (("max_new_tokens", max_new_tokens), ("min_new_tokens", min_new_tokens)):
        if isinstance(n, bool) or not hasattr(type(n), "__index__"):   # 2.5 failed in torch.zeros, None on '<'
            raise TypeError(f"{name}={n!r}: expected an int")
    if max_new_tokens < 1 or not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"need 1 <= max_new_tokens and 0 <= min_new_tokens <= max_new_tokens, "
                         f"got max_new_tokens={max_new_tokens}, min_new_tokens={min_new_tokens}")
    check_logit_args(V, temperature, top_p, valid_vocab_size, eos_token_ids, min_new_tokens)
    if isinstance(pad_token_id, bool) or not hasattr(type(pad_token_id), "__index__"):   # 1.5 was read as id 1
        raise TypeError(f"pad_token_id={pad_token_id!r}: expected an int")
    if not 0 <= pad_token_id < V:
        raise ValueError(f"pad_token_id={pad_token_id}, expected an id in [0, {V})")


def check_logit_args(vocab_size, temperature=1.0, top_p=1.0, valid_vocab_size=None, eos_token_ids=(),
                     min_new_tokens=0) -> None:
    """The logit-processing arguments that generate() and the teacher-forced scorers (logprobs_from_logits,
    grpo.token_logprobs / token_entropy) share, each checked with an error naming it (TypeError / ValueError), so
    that the scorer refuses what the sampler refuses (top_p = 0 scored NaN, temperature NaN the temperature-1
    distribution). vocab_size: V, the logits' last dimension."""
    V = vocab_size
    for name, x in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(x, bool) or not isinstance(x, (numbers.Real, torch.Tensor)):
            raise TypeError(f"{name}={x!r}: expected a number")
    if not (temperature >= 0 and math.isfinite(temperature)):                      # NaN fails the test
        raise ValueError(f"temperature={temperature}: need temperature >= 0 and finite")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: need 0 < top_p <= 1")
    if valid_vocab_size is not None:
        if isinstance(valid_vocab_size, bool) or not hasattr(type(valid_vocab_size), "__index__"):
            raise TypeError(f"valid_vocab_size={valid_vocab_size!r}: expected an int or None")
        if not 0 < valid_vocab_size <= V:             # 0 gave NaN log-probs, -1 masked the last id
            raise ValueError(f"valid_vocab_size={valid_vocab_size}, expected 1..{V}")
    if isinstance(min_new_tokens, bool) or not hasattr(type(min_new_tokens), "__index__"):
        raise TypeError(f"min_new_tokens={min_new_tokens!r}: expected an int")
    if min_new_tokens < 0:
        raise ValueError(f"min_new_tokens={min_new_tokens}: expected >= 0")
    if hasattr(type(eos_token_ids), "__index__") and not (isinstance(eos_token_ids, torch.Tensor)
                                                          and eos_token_ids.dim() > 0):   # HF's may be a bare int
        raise TypeError(f"eos_token_ids={eos_token_ids!r}: expected a sequence of token ids, e.g. ({eos_token_ids},)")
    if eos_token_ids is None or isinstance(eos_token_ids, (str, bytes)) or not hasattr(eos_token_ids, "__iter__"):
        raise TypeError(f"eos_token_ids={eos_token_ids!r}: expected a sequence of token ids (() for none)")
    for e in eos_token_ids:
        try:
            i = operator.index(e) if not isinstance(e, bool) else None
        except TypeError:
            i = None
        if i is None:                                  # 3.7 was read as id 3
            raise TypeError(f"eos_token_ids={list(eos_token_ids)}: expected integer token ids, got {e!r}")
        if not 0 <= i < V:                             # -1 banned id V-1, V an IndexError
            raise ValueError(f"eos_token_ids={list(eos_token_ids)}: expected ids in [0, {V})")


def left_pad(prompts: list[list[int]], pad_token_id: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists of different lengths -> (tokens, mask) [B, Tp] long / bool, left-padded with pad_token_id
    (mask False there); ids must be integers in [0, vocab_size)."""
    B, Tp = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((B, Tp), pad_token_id, dtype=torch.long)
    mask = torch.zeros(B, Tp, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids = torch.as_tensor(p)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:   # 1.5 would become 1
            raise TypeError(f"prompts[{b}]: expected integer token ids, got {ids.dtype}")
        tokens[b, Tp - len(p):] = ids
        mask[b, Tp - len(p):] = True
    if int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
    return tokens, mask


class Qwen2(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)
        self._inv_freq = None                    # fp32 RoPE frequencies; a plain attribute so .to(dtype) skips it
        self.grad_checkpointing = False          # True: a training forward keeps only each layer's input and
                                                 # recomputes the layer in the backward (activation memory / ~N)

    def inv_freq(self, device) -> torch.Tensor:
        """theta^(-2i/hd), i = 0..hd/2-1, fp32 [hd/2], cached per device."""
        if self._inv_freq is None or self._inv_freq.device != device:
            hd = self.config.head_dim
            self._inv_freq = 1.0 / (self.config.rope_theta ** (
                torch.arange(0, hd, 2, dtype=torch.float, device=device) / hd))
        return self._inv_freq

    def rope_table(self, n: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n, 1, hd] of positions 0..n-1 (rope_cos_sin), in `dtype`; every forward looks its positions
        up in such a table (the cache holds one for its max_len: no cos/sin work in the decode step)."""
        return rope_cos_sin(torch.arange(n, device=device), self.inv_freq(device), dtype)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    @property
    def dtype(self):
        return self.lm_head.weight.dtype

    @property
    def device(self):
        return self.lm_head.weight.device

    def active_layers(self, skip_mask=None) -> tuple[int, ...]:
        """Host-side skip mask (N bools, True = skipped) -> indices of the layers that run."""
        N = self.config.num_hidden_layers
        if skip_mask is None:
            return tuple(range(N))
        if isinstance(skip_mask, torch.Tensor):
            skip_mask = skip_mask.tolist()
        skip_mask = list(skip_mask)
        if len(skip_mask) != N:
            raise ValueError(f"skip_mask has {len(skip_mask)} entries, expected num_hidden_layers={N}")
        if any(s not in (True, False) for s in skip_mask):
            raise ValueError(f"skip_mask={skip_mask!r}: expected booleans (True = layer skipped)")
        return tuple(i for i, s in enumerate(skip_mask) if not s)

    def new_cache(self, batch: int, max_len: int, skip_mask=None) -> KVCache:
        """Under autocast (fp32 master weights, bf16 compute) the cache takes the autocast dtype: half the bytes."""
        dev = self.device
        dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else self.dtype
        return KVCache(self.config, self.active_layers(skip_mask), batch, max_len, dtype, dev,
                       self.rope_table(max_len, self.dtype, dev))         # RoPE in the model dtype, as forward

    @torch.no_grad()
    def pack_for_decode(self, cache: KVCache) -> bool:
        """Attach decode copies of the active layers' matrices and the LM head to `cache` (DecodeWeights: q|k|v and
        gate|up fused, matrices of PACK_MIN_BYTES or more prepacked), in the cache dtype (bf16 held and multiplied
        in fp32 where the CPU has no bf16 hardware: DecodeLinear), for its one-token steps and the LM head of
        generate()'s prefill (one position per row).
        Only on CPU with oneDNN, fp32/bf16, with whole parameters (not FSDP shards; inside distributed.gathered()
        they are whole); otherwise nothing (returns False). Costs one pass over the weights plus page faults on the
        copy (0.5B shape: ~5-15 decode steps' worth), paid once per weight update: later calls with the same
        weights (_weights_key; any optimizer step drops the packing) and dtype reuse it, whatever their number of
        rows (the smaller last batch of an evaluation or of a step's rollout chunks; except pack_rows' lone row).
        Holds the fused and prepacked copies for as long as the model lives and its weights are unchanged.
        The weights must not change while a cache uses them."""
        dtype, rows = cache.k.dtype, pack_rows(cache.k.shape[1])
        if (self.device.type != "cpu" or not torch.backends.mkldnn.is_available()
                or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight")          # private op: may vanish
                or dtype not in (torch.float32, torch.bfloat16)
                or any(type(p.data) is not torch.Tensor for p in self.parameters())):    # DTensor shards
            return False
        compute = torch.float32 if dtype == torch.bfloat16 and not native_bf16_matmul() else dtype  # DecodeLinear
        # reuse the last packing while the weights are unchanged (_weights_key; any optimizer step also drops it).
        # One packing is kept per model.
        (ptrs, sample), packed = _weights_key(self), _PACKED.get(self)
        key = (dtype, compute, ptrs)
        if (packed is None or packed["key"] != key or not torch.equal(packed["sample"], sample)
                or packed["rows"] < rows):                          # a lone row's packing, now several rows
            packed = _PACKED[self] = {"key": key, "sample": sample, "rows": rows, "layers": {},
                                      "lm_head": DecodeLinear((self.lm_head,), dtype, rows, compute)}
        for i in cache.active:
            if i not in packed["layers"]:
                packed["layers"][i] = DecodeWeights(self.model.layers[i], dtype, rows, compute)
        cache.weights = [packed["layers"][i] for i in cache.active]
        cache.lm_head = packed["lm_head"]
        return True

    def forward(self, input_ids, skip_mask=None, attention_mask=None, logits_from: int = 0, cache=None):
        """input_ids [B, T] long; skip_mask: N host bools (True = layer is identity); attention_mask [B, T]
        (1 = token, 0 = padding; positions = number of real tokens before, so left padding is exact);
        logits_from: logits only for positions >= logits_from; cache: a KVCache from new_cache() with the
        same skip_mask, appended at its current length (prefill, then decode one token at a time).
        Returns logits [B, T - logits_from, V] in the model dtype."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:   # was "not enough values to unpack"
            raise ValueError(f"input_ids {tuple(getattr(input_ids, 'shape', ())) or type(input_ids).__name__}: "
                             f"expected a [B, T] tensor of token ids")
        B, T = input_ids.shape
        dev = input_ids.device
        active = self.active_layers(skip_mask)
        if not 0 <= logits_from <= T:
            raise ValueError(f"logits_from={logits_from}, expected 0..{T}")
        am = None if attention_mask is None else attention_mask.to(device=dev, dtype=torch.bool)
        if am is not None and am.shape != (B, T):
            raise ValueError(f"attention_mask has shape {tuple(am.shape)}, expected {(B, T)}")
        try:                             # before the cache is touched: a bad id leaves it as it was
            x = self.model.embed_tokens(input_ids)                                       # [B, T, D]
        except IndexError:               # CPU (CUDA asserts on the device instead); was "index out of range in self"
            raise ValueError(f"input_ids: token ids must be in [0, {self.config.vocab_size}), got "
                             f"{int(input_ids.min())}..{int(input_ids.max())}") from None
        mask, start = None, 0                            # mask None = plain causal over all keys (no padding)
        if cache is None:
            cos, sin = self.rope_table(T, self.dtype, dev)                                # [T, 1, hd]
            if am is not None:
                pos = (am.long().cumsum(-1) - 1).clamp(min=0)                             # [B, T]
                cos, sin, mask = cos[pos], sin[pos], padded_causal_mask(am, T, 0)         # [B, T, 1, hd]
        else:
            if cache.active != active:
                raise ValueError("forward(cache=...): skip_mask differs from the one the cache was built for")
            start = cache.length
            if start + T > cache.max_len:
                raise ValueError(f"KV cache overflow: {start}+{T} > max_len={cache.max_len}")
            if am is None:                               # every token is real (the decode step): no mask ops
                pos = cache.next_pos[:, None] + torch.arange(T, device=dev) if T > 1 else cache.next_pos[:, None]
                cache.next_pos = cache.next_pos + T
            else:
                cache.mask[:, start:start + T] = am
                cache.bias[:, start:start + T].masked_fill_(~am, float("-inf"))
                cache.has_padding = cache.has_padding or not bool(am.all())             # one sync per call
                pos = (cache.next_pos[:, None] + am.long().cumsum(-1) - 1).clamp(min=0)   # [B, T]
                cache.next_pos = cache.next_pos + am.long().sum(-1)
            cos, sin = cache.cos[pos], cache.sin[pos]                                     # [B, T, 1, hd]
            cache.length = start + T
            if cache.has_padding and T == 1:                                             # decode: a view
                mask = cache.bias[:, None, None, :start + 1]                             # [B, 1, 1, S]
            elif cache.has_padding:
                mask = padded_causal_mask(cache.mask[:, :start + T], T, start)
        packed = cache is not None and cache.weights is not None           # pack_for_decode's copies (CPU)
        recompute = self.grad_checkpointing and cache is None and torch.is_grad_enabled()
        for j, i in enumerate(active):
            if recompute:                # the same layer call, its activations recomputed in the backward
                x = torch.utils.checkpoint.checkpoint(self.model.layers[i], x, cos, sin, mask, use_reentrant=False)
                continue
            kv = None if cache is None else (cache.k[j], cache.v[j])
            w = cache.weights[j] if packed and T == 1 else None                          # one-token step
            x = self.model.layers[i](x, cos, sin, mask, kv, start, w)
        x = self.model.norm(x[:, logits_from:] if logits_from else x)                    # [B, T', D]
        head = self.lm_head
        if packed and x.shape[1] == 1:
            head = cache.lm_head         # one position per row: a decode step, or generate()'s prefill
        return head(x)                                                                   # [B, T', V]

    # ------------------------------------------------------------------------------------------------------
    # sampling

    def generate(self, prompts: list[list[int]], max_new_tokens: int, min_new_tokens: int = 0,
                 temperature: float = 1.0, top_p: float = 1.0, skip_mask=None, eos_token_ids=(),
                 pad_token_id: int = 0, generator: torch.Generator | None = None,
                 valid_vocab_size: int | None = None) -> GenerateOutput:
        """Batched sampling from prompts of different lengths (left-padded; positions from the mask).
        Prefill, then one token per step with a preallocated KV cache of the active layers only.
        temperature 0 = greedy; the recorded log-probs are then those of the temperature-1 distribution
        (after vocab masking, EOS ban and top-p). Otherwise the log-probs are those of the exact distribution
        each token was drawn from (vocab masking, EOS ban before min_new_tokens, /temperature, top-p); they
        equal logprobs_from_logits(model(seq, skip_mask)[...], ...) with the same arguments.
        A row stops after its first EOS id: later tokens are pad_token_id, mask False, logprob 0."""
        # inference mode: no autograd bookkeeping (version counters, views) on each of the ~40 ops a layer
        # runs per decode step, ~9 % of a small model's step on the CPU; the outputs are cloned out of it into
        # ordinary tensors, which a loss may then use like any other
        with torch.inference_mode():
            out = self._generate(prompts, max_new_tokens, min_new_tokens, temperature, top_p, skip_mask,
                                 eos_token_ids, pad_token_id, generator, valid_vocab_size)
        return GenerateOutput(*(getattr(out, f.name).clone() for f in fields(out)))

    def _generate(self, prompts, max_new_tokens, min_new_tokens, temperature, top_p, skip_mask, eos_token_ids,
                  pad_token_id, generator, valid_vocab_size) -> GenerateOutput:
        V, dev = self.config.vocab_size, self.device
        check_generate_args(prompts, V, max_new_tokens, min_new_tokens, temperature, top_p, eos_token_ids,
                            pad_token_id, valid_vocab_size)
        if generator is not None and generator.device.type != dev.type:
            raise ValueError(f"generator is on {generator.device}, expected the model's device {dev}")
        prompt_tokens, prompt_mask = left_pad(prompts, pad_token_id, V)                # [B, Tp] on the CPU
        B, Tp = prompt_tokens.shape
        prompt_tokens, prompt_mask = prompt_tokens.to(dev), prompt_mask.to(dev)
        eos = torch.as_tensor(list(eos_token_ids), dtype=torch.long, device=dev)
        banned = eos if len(eos) and min_new_tokens > 0 else None

        cache = self.new_cache(B, Tp + max_new_tokens - 1, skip_mask)
        if max_new_tokens >= PACK_MIN_NEW_TOKENS:                      # CPU: skinny matmuls 2-3x faster
            self.pack_for_decode(cache)
        tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=dev)
        logprobs = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=dev)
        alive = torch.ones(B, dtype=torch.bool, device=dev)
        mask = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=dev)
        logits = self(prompt_tokens, skip_mask, prompt_mask, logits_from=Tp - 1, cache=cache)[:, -1]  # [B, V]
        n = max_new_tokens
        for t in range(max_new_tokens):
            logp = process_logits(logits, temperature, top_p, valid_vocab_size,
                                  banned if t < min_new_tokens else None)         # [B, V] fp32
            tok = sample_from_logprobs(logp, temperature, generator)           # [B]
            lp = logp.gather(-1, tok[:, None]).squeeze(-1)                     # [B]
            tokens[:, t] = torch.where(alive, tok, pad_token_id)
            logprobs[:, t] = torch.where(alive, lp, 0.0)
            mask[:, t] = alive
            if len(eos):
                alive = alive & ~torch.isin(tok, eos)
                if not bool(alive.any()):                                      # one host sync per step
                    n = t + 1
                    break
            if t + 1 < max_new_tokens:
                logits = self(tok[:, None], skip_mask, cache=cache)[:, -1]
        return GenerateOutput(tokens[:, :n], mask[:, :n], logprobs[:, :n], prompt_tokens, prompt_mask)

    # ------------------------------------------------------------------------------------------------------
    # checkpoint I/O (HF layout: config.json + model.safetensors or shards + model.safetensors.index.json)

    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        sd = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight")
        return sd

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None) -> "Qwen2":
        """Load an HF-layout checkpoint directory strictly: every missing, unexpected, mis-shaped or non-finite
        (NaN / inf) tensor is an error naming it. dtype: torch dtype or name (default float32); device: default cpu.
        A tied checkpoint (tie_word_embeddings) has no lm_head.weight; if one is present it is ignored."""
        from safetensors import safe_open
        try:
            from safetensors import SafetensorError
        except ImportError:                       # safetensors < 0.4.4 does not re-export it
            from safetensors._safetensors_rust import SafetensorError
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: checkpoint directory not found")
        cfg = Qwen2Config.from_json(path / "config.json")
        dtype = torch.float32 if dtype is None else _as_dtype(dtype)
        device = torch.device("cpu") if device is None else parse_device(device)   # before any weight is read
        index = path / "model.safetensors.index.json"
        if (path / "model.safetensors").is_file():
            files = [path / "model.safetensors"]
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                    raise TypeError
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise ValueError(f"{index}: expected JSON with a 'weight_map' object "
                                 f"(tensor name -> shard file)") from None
            files = [path / f for f in sorted(set(weight_map.values()))]
            for f in files:
                if not f.is_file():
                    raise FileNotFoundError(f"{f}: shard listed in {index} not found")
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")

        with torch.device("meta"):
            model = cls(cfg)
        expected = model._expected_shapes()
        sd = {}
        for f in files:
            try:                                  # a truncated / corrupt file: one line naming it, no Rust trace
                with safe_open(str(f), framework="pt", device="cpu") as st:
                    for name in st.keys():
                        if (name == "lm_head.weight" and cfg.tie_word_embeddings
                                or name.endswith("rotary_emb.inv_freq")):
                            continue
                        if name not in expected:
                            raise ValueError(f"{f}: unexpected tensor {name!r}")
                        shape = tuple(st.get_slice(name).get_shape())
                        if shape != expected[name]:
                            raise ValueError(f"{f}: tensor {name!r} has shape {shape}, expected {expected[name]}")
                        t = st.get_tensor(name)
                        if t.is_floating_point() and not torch.isfinite(t).all():   # would sample garbage or fail
                            raise ValueError(f"{f}: tensor {name!r} has NaN or infinite values (a diverged run's "
                                             f"or a damaged checkpoint)")
                        sd[name] = t.to(device=device, dtype=dtype)
            except SafetensorError as err:
                raise ValueError(f"{f}: not a readable safetensors file ({err})") from None
        missing = [k for k in expected if k not in sd]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(f"{path}: missing tensor {missing[0]!r}{more}")
        if cfg.tie_word_embeddings:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        model.load_state_dict(sd, strict=True, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model

    def save_pretrained(self, path, max_shard_size_bytes: int = 5_000_000_000, also_write=None):
        """Write config.json + model.safetensors (or model-0000i-of-0000n.safetensors shards and
        model.safetensors.index.json when the weights exceed max_shard_size_bytes) in the HF layout, loadable
        by transformers and vLLM. Atomic: everything is written to a temp dir beside `path` which is then
        renamed to `path`. If `path` already exists, its other files (e.g. a tokenizer) are copied into the temp
        dir, the old folder is renamed aside, the new one into place, and only then the old one is deleted: a
        failed save leaves the previous checkpoint whole. also_write(temp_dir), e.g. a tokenizer's save, adds
        files that then appear with the weights in the same rename."""
        from safetensors.torch import save_file
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight")
        shards, cur, size = [], {}, 0
        for k, v in sd.items():
            if cur and size + v.nbytes > max_shard_size_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[k], size = v, size + v.nbytes
        shards.append(cur)
        cfg = self.config.to_dict()
        cfg["torch_dtype"] = str(self.dtype).removeprefix("torch.")
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)           # the mode mkdir() would give (mkdtemp makes it 0700)
        try:
            if len(shards) == 1:
                save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
            else:
                weight_map = {}
                for i, shard in enumerate(shards):
                    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                    save_file(shard, str(tmp / name), metadata={"format": "pt"})
                    weight_map.update({k: name for k in shard})
                index = {"metadata": {"total_size": sum(v.nbytes for v in sd.values())}, "weight_map": weight_map}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
            for f in tmp.iterdir():             # the mode open() would give (safetensors writes its files 0600)
                os.chmod(f, 0o666 & ~umask)
            existed = path.exists()
            if existed:     # copy in its other files (a tokenizer, ...), not its config or weights
                ours = lambda n: n in ("config.json", "model.safetensors.index.json") or (
                    n.startswith("model") and n.endswith(".safetensors"))
                shutil.copytree(path, tmp, dirs_exist_ok=True,
                                ignore=lambda d, names: [n for n in names if Path(d) == path and ours(n)])
            if also_write is not None:
                also_write(tmp)
            if not existed:
                os.replace(tmp, path)
                return
            # swap the folders; the old one is deleted only once the new one is in place
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)                                   # put the previous checkpoint back
                raise
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

"""A small GPT (after nanoGPT) whose attention is picked by name.

``GPT(GPTConfig(attention=...))``: byte-level tokens (vocabulary 256), pre-norm blocks
(LayerNorm -> attention -> residual, LayerNorm -> MLP -> residual), rotary positions inside
the attention (no position embedding), the output head tied to the token embedding.

The attentions (:data:`ATTENTIONS`), all with the same parameters (a fused ``qkv``
projection and an output ``proj``), so that only the attention itself differs:

* ``dense``, ``hash``, ``qk``: :class:`sparseflash.nn.SparseCausalSelfAttention` (our
  Triton kernels: dense causal FlashAttention, hash buckets, query/key dropping).
* ``sdpa``, ``sdpa_cudnn``: :class:`SDPACausalSelfAttention`, the same module calling
  :func:`torch.nn.functional.scaled_dot_product_attention` restricted to one backend
  (FlashAttention-2, or cuDNN) on CUDA.
* ``none``: the same module with the attention removed: ``y = v`` (the projections stay).
  Its step time is the time of everything but attention: no attention, however fast,
  makes a step quicker than this (Amdahl's ceiling).  Its loss is that of a model whose
  tokens never see each other.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .._runtime import check_window
from ..nn import DEFAULT_WINDOW, SparseCausalSelfAttention, rotary

ATTENTIONS = ("dense", "sdpa", "sdpa_cudnn", "hash", "qk", "none")
WINDOWED = ("dense", "hash", "qk")  #: attentions that take a sliding window (our kernels)
VOCAB = 256


@dataclass
class GPTConfig:
    """Shape of the model and its attention.

    ``n_buckets`` is read with ``attention="hash"``; ``keep_rate`` and ``qk_gate`` with
    ``attention="qk"``; ``window`` (a causal sliding window united with the pattern) with
    ``dense``, ``hash`` and ``qk``, None meaning the mode's default (128 for ``hash``, else
    0; see :class:`~sparseflash.nn.SparseCausalSelfAttention`).
    """

    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 512
    n_kv_heads: int | None = None
    attention: str = "dense"
    n_buckets: int = 16
    keep_rate: float = 0.5
    qk_gate: str = "topk"
    window: int | None = None
    vocab_size: int = VOCAB

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.window is not None:
            self.window = check_window(self.window)
            if self.window and self.attention not in WINDOWED:
                raise ValueError(f"window applies to attention {WINDOWED}, not {self.attention!r}")

    @property
    def effective_window(self) -> int:
        """The window the attention uses (the mode's default where ``window`` is None)."""
        if self.attention not in WINDOWED:
            return 0
        return DEFAULT_WINDOW[self.attention] if self.window is None else self.window

    def to_dict(self) -> dict:
        return asdict(self)


class SDPACausalSelfAttention(nn.Module):
    """:class:`~sparseflash.nn.SparseCausalSelfAttention`'s shape (``qkv``, ``proj``, rotary,
    GQA) around PyTorch's ``scaled_dot_product_attention``.

    ``backend``: ``"flash"`` (SDPA's FlashAttention-2 kernel), ``"cudnn"`` (cuDNN's), or
    ``"none"`` (no attention: ``y = v``, see the module docstring).  On CUDA the backend is
    the only one allowed, so a run that cannot use it fails instead of timing another one.
    On the CPU neither kernel exists: PyTorch then picks its own CPU kernel (same maths).
    """

    BACKENDS = ("flash", "cudnn", "none")

    def __init__(self, embed_dim: int, n_heads: int, *, backend: str = "flash", n_kv_heads: int | None = None,
                 bias: bool = False):
        super().__init__()
        if backend not in self.BACKENDS:
            raise ValueError(f"backend must be one of {self.BACKENDS}, got {backend!r}")
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if embed_dim % n_heads or n_heads % n_kv_heads:
            raise ValueError(f"embed_dim ({embed_dim}) % n_heads ({n_heads}) and n_heads % n_kv_heads "
                             f"({n_kv_heads}) must be 0")
        self.embed_dim, self.n_heads, self.n_kv_heads, self.backend = embed_dim, n_heads, n_kv_heads, backend
        self.head_dim = embed_dim // n_heads
        self.qkv = nn.Linear(embed_dim, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=bias)
        self.proj = nn.Linear(n_heads * self.head_dim, embed_dim, bias=bias)

    def extra_repr(self) -> str:
        return f"{self.embed_dim}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, backend={self.backend!r}"

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).view(B, N, H + 2 * Hkv, D).transpose(1, 2).split([H, Hkv, Hkv], dim=1)
        if self.backend == "none":
            y = v.repeat_interleave(H // Hkv, dim=1) if Hkv != H else v
        else:
            q, k = rotary(q), rotary(k)
            gqa = {"enable_gqa": True} if Hkv != H else {}
            if x.is_cuda:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                backend = SDPBackend.FLASH_ATTENTION if self.backend == "flash" else SDPBackend.CUDNN_ATTENTION
                with sdpa_kernel(backend):
                    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
            else:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
        return self.proj(y.transpose(1, 2).reshape(B, N, H * D))


def make_attention(cfg: GPTConfig, layer: int) -> nn.Module:
    """The attention of block ``layer`` (LSH rotations seeded by the layer index)."""
    if cfg.attention in ("dense", "hash", "qk"):
        return SparseCausalSelfAttention(cfg.n_embd, cfg.n_head, mode=cfg.attention, n_kv_heads=cfg.n_kv_heads,
                                         n_buckets=cfg.n_buckets, keep_rate=cfg.keep_rate, qk_gate=cfg.qk_gate,
                                         window=cfg.window, seed=layer)
    backend = {"sdpa": "flash", "sdpa_cudnn": "cudnn", "none": "none"}[cfg.attention]
    return SDPACausalSelfAttention(cfg.n_embd, cfg.n_head, backend=backend, n_kv_heads=cfg.n_kv_heads)


class MLP(nn.Module):
    def __init__(self, n_embd: int):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=False)
        self.attn = make_attention(cfg, layer)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=False)
        self.mlp = MLP(cfg.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """``forward(idx (B, N) int64, targets=None) -> (logits (B, N, vocab), loss or None)``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=False)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head.weight = self.wte.weight  # tied
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def n_params(self) -> int:
        """Parameters (the tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: Tensor, targets: Tensor | None = None):
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss


def flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token of the dense model (6 per parameter-token, plus causal
    attention: ``6 * n_layer * seq_len * n_embd``, half of the full ``12 ·L·N·C`` since
    causal), the usual estimate (PaLM appendix B), used for an effective TFLOP/s."""
    per_layer = 12 * cfg.n_embd ** 2 + (cfg.n_embd * cfg.n_embd * 2 * ((cfg.n_kv_heads or cfg.n_head) - cfg.n_head)
                                         // cfg.n_head)
    n = cfg.n_layer * per_layer + cfg.vocab_size * cfg.n_embd
    return 6 * n + 6 * cfg.n_layer * seq_len * cfg.n_embd

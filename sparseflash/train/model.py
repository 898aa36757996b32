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

Sampling: :meth:`GPT.generate` (nanoGPT's), with a key/value cache (one token's work per
new token) for every attention but ``qk``, whose top-k gate ranks the tokens of a whole
sequence and so cannot be decoded one token at a time; ``python -m sparseflash.train
sample`` samples from a training checkpoint.  On CUDA a cached step of our attentions runs
the Triton decode kernel (:func:`sparseflash.decode_attention`; ``hash``: over the window
and its bucket's row list, no mask over the cache), with no host synchronisation.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .._runtime import check_window
from ..nn import DEFAULT_WINDOW, KVCache, SparseCausalSelfAttention
from ..rotary import rotary

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

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        """``x`` ``(B, N, C)`` -> ``(B, N, C)``; with ``cache``, as
        :meth:`SparseCausalSelfAttention.forward` (record, then decode one token at a time;
        the decode step is SDPA itself, one query against the cache's keys, with PyTorch's own
        choice of backend: the forward's backend rule is for timing training steps)."""
        B, N, C = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).view(B, N, H + 2 * Hkv, D).transpose(1, 2).split([H, Hkv, Hkv], dim=1)
        if cache is not None and len(cache):
            if N != 1:
                raise ValueError(f"with a filled cache, x must be one token (batch, 1, {C}), got {tuple(x.shape)}")
            if self.backend == "none":
                y = v.repeat_interleave(H // Hkv, dim=1) if Hkv != H else v
                cache.length += 1  # only the position counts: nothing is attended
            else:
                pos = len(cache)
                q, k = rotary(torch.cat([q, k], dim=1), offset=pos).split([H, Hkv], dim=1)
                cache.append(k, v)
                L = len(cache)
                gqa = {"enable_gqa": True} if Hkv != H else {}
                # The new query is the last position: every cached key is allowed, no mask.
                y = F.scaled_dot_product_attention(q, cache.k[:, :, :L], cache.v[:, :, :L], **gqa)
            return self.proj(y.transpose(1, 2).reshape(B, N, H * D))
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
        if cache is not None:
            if self.backend == "none":
                cache.length += N
            else:
                cache.append(k, v)
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

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        x = x + (self.attn(self.ln1(x)) if cache is None else self.attn(self.ln1(x), cache=cache))
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

    @property
    def can_cache(self) -> bool:
        """Whether :meth:`generate` can use a key/value cache (every attention but ``qk``)."""
        return self.cfg.attention != "qk"

    def _forward_cached(self, idx: Tensor, caches: list[KVCache]) -> Tensor:
        """Logits ``(B, vocab)`` of the last token of ``idx``: the whole prompt into empty
        ``caches`` (the ordinary forward, recording keys), or one token ``(B, 1)`` after them."""
        x = self.wte(idx)
        for block, cache in zip(self.blocks, caches):
            x = block(x, cache=cache)
        return self.head(self.ln_f(x[:, -1]))

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
                 use_cache: bool = True, generator: torch.Generator | None = None,
                 max_context: int | None = None, decode_kernel: bool | None = None,
                 cuda_graph: bool = False) -> Tensor:
        """Continue ``idx`` ``(B, T)`` (int64 bytes) by ``max_new_tokens`` sampled tokens; returns
        ``(B, T + max_new_tokens)``.  As nanoGPT's, one token at a time.

        Args:
            temperature: the logits are divided by it before sampling; ``0``: greedy (argmax).
            top_k: sample among the ``top_k`` likeliest tokens only (None: all).
            use_cache: keep every layer's keys and values (after rotary; in ``hash`` mode with
                their buckets): the prompt runs once through the ordinary forward, then each new
                token costs one token's work and attends with exactly the pattern the forward
                would give it (``hash``: its bucket's keys and the ``window`` most recent).
                ``False``: re-run the forward over the whole context at each step (same tokens,
                up to rounding).  The ``qk`` attention refuses the cache (``ValueError``): its
                top-k gate ranks all tokens of the sequence; generate it with
                ``use_cache=False``, where each step re-ranks the current context (earlier tokens
                never change, but the keep set of a short context differs from that of a
                training sequence; ``qk_gate="random"`` redraws its dropping at each step).
            generator: the random generator of the sampling (on the model's device); the same
                seed gives the same tokens.
            max_context: the model sees at most this many most recent tokens (nanoGPT's
                ``block_size``; e.g. the training ``seq_len``).  None (default): all of them.
                Rotary positions have no limit, but a model has seen no position beyond its
                training ``seq_len``.  With the cache, once the context outgrows
                ``max_context`` each step re-runs the forward over the last ``max_context``
                tokens, as without the cache (a cache cannot forget its oldest tokens
                exactly: every later key depends on them).
            decode_kernel: how a cached step attends (:class:`~sparseflash.nn.KVCache`'s
                ``kernel``): None (default): the Triton decode kernel
                (:func:`sparseflash.decode_attention`) on CUDA, plain PyTorch in float32 on the
                CPU; True: the kernel on the CPU too (Triton's interpreter: slow, tiny models
                only); False: PyTorch everywhere.  ``sdpa`` decodes with SDPA whatever this says.
            cuda_graph: (CUDA, ``dense`` and ``hash`` attention, with the cache) capture one decode
                step of the whole model in a CUDA graph after the prompt, and replay it for every
                new token: the caches keep their length on the device
                (:class:`~sparseflash.nn.KVCache` ``device_position=True``), so the same kernels
                serve every position, and a token costs the GPU's time of one step instead of the
                host's time to launch its few hundred kernels.  The same tokens as without it
                (the same kernels run).  The caches are sized for ``prompt + max_new_tokens``;
                with ``max_context`` that must fit in it.

        The model's mode (train/eval) is left as it is; no gradients are recorded.
        :meth:`generate_iter` yields the new tokens one by one instead (to stream them).
        """
        new = list(self.generate_iter(idx, max_new_tokens, temperature=temperature, top_k=top_k,
                                      use_cache=use_cache, generator=generator, max_context=max_context,
                                      decode_kernel=decode_kernel, cuda_graph=cuda_graph))
        return torch.cat([idx, *new], dim=1)

    def generate_iter(self, idx: Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
                      use_cache: bool = True, generator: torch.Generator | None = None,
                      max_context: int | None = None, decode_kernel: bool | None = None,
                      cuda_graph: bool = False):
        """:meth:`generate`, yielding each new ``(B, 1)`` token as soon as it is sampled.  The
        arguments are checked at the call (``ValueError``), before the first token."""
        if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.shape[1] < 1 or idx.dtype != torch.long:
            raise ValueError(f"idx must be a (batch, T >= 1) int64 tensor, got "
                             f"{tuple(idx.shape) if isinstance(idx, Tensor) else type(idx).__name__}"
                             f"{' ' + str(idx.dtype) if isinstance(idx, Tensor) else ''}")
        if int(max_new_tokens) != max_new_tokens or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if top_k is not None and (int(top_k) != top_k or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        if max_context is not None and (int(max_context) != max_context or max_context < 1):
            raise ValueError(f"max_context must be a positive integer or None, got {max_context!r}")
        if decode_kernel is not None and not isinstance(decode_kernel, bool):
            raise ValueError(f"decode_kernel must be None, True or False, got {decode_kernel!r}")
        if not isinstance(cuda_graph, bool):
            raise ValueError(f"cuda_graph must be True or False, got {cuda_graph!r}")
        if cuda_graph:
            why = None
            if not use_cache:
                why = "it replays cached decode steps: use_cache=False re-runs the whole forward instead"
            elif self.cfg.attention not in ("dense", "hash"):
                why = (f"attention {self.cfg.attention!r} does not decode with our kernel (dense and hash do)")
            elif decode_kernel is False:
                why = "it replays our decode kernel: decode_kernel=False asks for PyTorch"
            elif max_context is not None and idx.shape[1] + int(max_new_tokens) > max_context:
                why = (f"the caches must hold the prompt and every new token, but prompt ({idx.shape[1]}) + "
                       f"max_new_tokens ({max_new_tokens}) > max_context ({max_context})")
            elif idx.device.type != "cuda":
                why = f"the model and idx must be on a CUDA device, got {idx.device}"
            if why:
                raise ValueError(f"cuda_graph=True cannot be used here: {why}")
        if use_cache and not self.can_cache:
            why = ("the top-k gate ranks all tokens of a sequence, later ones included" if self.cfg.qk_gate == "topk"
                   else "random dropping is redrawn over the whole sequence at every call")
            raise ValueError(f"attention {self.cfg.attention!r} cannot generate with a cache ({why}): pass "
                             "use_cache=False to re-run the forward over the context at every step")

        @torch.no_grad()
        def graphed_steps(idx):
            n_new = int(max_new_tokens)
            if n_new == 0:
                return
            caches = [KVCache(idx.shape[1] + n_new, kernel=True, device_position=True) for _ in self.blocks]
            token = _sample(self._forward_cached(idx, caches).float(), temperature, top_k, generator)
            yield token
            if n_new == 1:
                return
            static_token = token.clone()
            graph, static_logits = _capture_step(self, static_token, caches)
            for _ in range(n_new - 1):
                static_token.copy_(token)
                graph.replay()
                for c in caches:
                    c.length += 1
                token = _sample(static_logits.float(), temperature, top_k, generator)
                yield token

        @torch.no_grad()
        def steps(idx):
            caches = None
            for _ in range(int(max_new_tokens)):
                T = idx.shape[1]
                if use_cache and (max_context is None or T <= max_context):
                    if caches is None:
                        cap = idx.shape[1] + int(max_new_tokens)
                        caches = [KVCache(cap if max_context is None else min(cap, max_context),
                                          kernel=decode_kernel) for _ in self.blocks]
                        logits = self._forward_cached(idx, caches)
                    else:
                        logits = self._forward_cached(idx[:, -1:], caches)
                else:
                    caches = None
                    context = idx if max_context is None else idx[:, -max_context:]
                    logits = self(context)[0][:, -1]
                token = _sample(logits.float(), temperature, top_k, generator)
                idx = torch.cat([idx, token], dim=1)
                yield token

        return graphed_steps(idx) if cuda_graph else steps(idx)


def _capture_step(model: "GPT", token: Tensor, caches: list[KVCache]):
    """A CUDA graph of one decode step ``model._forward_cached(token, caches)`` and its logits
    buffer.  The step runs once first on a side stream (compiling the kernels; PyTorch's
    capture needs the warm-up), then every cache is put back as it was (device position,
    bucket counts, Python length), so the rows that warm-up wrote are overwritten later."""
    saved = [(c.length, c.position.clone(), None if c.bucket_count is None else c.bucket_count.clone())
             for c in caches]

    def restore():
        for c, (length, position, counts) in zip(caches, saved):
            c.length = length
            c.position.copy_(position)
            if counts is not None:
                c.bucket_count.copy_(counts)

    # Under autocast, no cast cache: a cached cast made outside the graph would be freed when the
    # caller's autocast region ends, while the graph still reads it (PyTorch's CUDA-graph notes).
    cast = (torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
            if torch.is_autocast_enabled("cuda") else contextlib.nullcontext())
    stream = torch.cuda.Stream(token.device)
    stream.wait_stream(torch.cuda.current_stream(token.device))
    with torch.cuda.stream(stream), cast:
        model._forward_cached(token, caches)
        restore()
    torch.cuda.current_stream(token.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), cast:
        logits = model._forward_cached(token, caches)
    restore()  # (capture ran no kernel; this puts back the Python lengths it advanced)
    return graph, logits


def _sample(logits: Tensor, temperature: float, top_k: int | None, generator) -> Tensor:
    """``(B, 1)`` next tokens from ``logits`` ``(B, vocab)``."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, int(top_k), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token of the dense model (6 per parameter-token, plus causal
    attention: ``6 * n_layer * seq_len * n_embd``, half of the full ``12 ·L·N·C`` since
    causal), the usual estimate (PaLM appendix B), used for an effective TFLOP/s."""
    per_layer = 12 * cfg.n_embd ** 2 + (cfg.n_embd * cfg.n_embd * 2 * ((cfg.n_kv_heads or cfg.n_head) - cfg.n_head)
                                         // cfg.n_head)
    n = cfg.n_layer * per_layer + cfg.vocab_size * cfg.n_embd
    return 6 * n + 6 * cfg.n_layer * seq_len * cfg.n_embd

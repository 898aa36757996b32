"""sparseflash: sparse causal FlashAttention in Triton.

Dense causal FlashAttention (:func:`flash_attention`), query/key dropping
(:func:`qk_sparse_attention`) and hash-bucket attention (:func:`hash_sparse_attention`),
forward and backward, and one-token decoding against a KV cache
(:func:`decode_attention`), each checked against the float64 reference in
:mod:`sparseflash.reference`.  Tensors are ``(batch, heads, seq_len, head_dim)`` as
in :func:`torch.nn.functional.scaled_dot_product_attention`.

Without a CUDA device the kernels run on CPU tensors through Triton's interpreter.
"""
from . import _runtime  # noqa: F401  (first: picks the interpreter before any kernel is defined)
from . import reference
from .decode import decode_attention
from .flash import flash_attention
from .hash_sparse import hash_sparse_attention
from .hashing import lsh_buckets
from .permuted import permuted_attention
from .qk_sparse import qk_sparse_attention, random_keep, topk_keep

__all__ = [
    "flash_attention",
    "qk_sparse_attention",
    "hash_sparse_attention",
    "permuted_attention",
    "decode_attention",
    "random_keep",
    "topk_keep",
    "lsh_buckets",
    "reference",
]
__version__ = "0.1.0"

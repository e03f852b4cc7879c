"""Token streams for training: the built-in standard-library corpus, or nanoGPT-style ``.bin`` files.

Built-in corpus (the default, no download): every ``.py`` file of this Python's standard library
(the directory of the :mod:`os` module, ``sysconfig.get_paths()["stdlib"]``), found by a sorted walk
that skips test directories (``test``, ``tests``, ``idle_test``), ``site-packages`` and
``__pycache__``, each file preceded by a separator line ``# ==== <relative path> ====`` and
concatenated in that order. Tokens are its bytes (ids 0–255, a 256-entry vocabulary). On the
development machine (CPython 3.11.7) it is 734 files and 12,142,937 bytes; the count differs
slightly between Python versions, and the cache file name carries the version and a fingerprint of
the file list. The assembled corpus is cached under ``~/.cache/dash_shampoo`` (or
``$XDG_CACHE_HOME/dash_shampoo``, or ``--cache-dir``). ``--corpus-bytes`` keeps only its first
bytes (default 20 MB, i.e. all of it). The first 90% of the bytes are the training split and the
last 10% the validation split (by position, so validation is the alphabetically last modules).

``--data DIR``: ``DIR/train.bin`` and ``DIR/val.bin`` hold little-endian ``uint16`` token ids, the
layout of nanoGPT's ``prepare.py``; they are memory-mapped (``torch.from_file``), never read
whole.

Batches: the training batch of step ``s`` on rank ``r`` is drawn from a ``torch.Generator``
seeded from ``(seed, s, r)`` alone, so the data position is the step counter: a resumed run sees
the same batches as an uninterrupted one, and every optimizer of a comparison sees the same data.
Validation uses a fixed set of evenly spaced windows of the validation split.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

#: Directory names never entered when assembling the built-in corpus.
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
#: Default cap on the built-in corpus (bytes); the whole standard library is smaller.
DEFAULT_CORPUS_BYTES = 20_000_000
#: Fraction of the tokens used for training; the rest (the end of the stream) is validation.
TRAIN_FRACTION = 0.9


@dataclass
class TokenData:
    """Two 1-D integer token streams and the vocabulary size they draw from.

    Attributes:
        train: training tokens (``uint8`` or ``uint16``, possibly memory-mapped).
        val: validation tokens.
        vocab_size: every id is below this.
        source: a human-readable description (for logs and result files).
    """

    train: torch.Tensor
    val: torch.Tensor
    vocab_size: int
    source: str


# ----------------------------------------------------------------------------------------------
# The built-in corpus
# ----------------------------------------------------------------------------------------------


def stdlib_root() -> Path:
    """The standard library directory (where the ``os`` module lives)."""
    return Path(sysconfig.get_paths()["stdlib"] or os.path.dirname(os.__file__))


def corpus_files(root: Path | None = None) -> list[Path]:
    """The ``.py`` files of the corpus, sorted by path relative to ``root`` (default: the stdlib)."""
    root = root if root is not None else stdlib_root()
    skip = {Path(p).resolve() for key in ("purelib", "platlib") if (p := sysconfig.get_paths().get(key))}
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(
            d for d in subdirs if d not in EXCLUDED_DIRS and (Path(directory) / d).resolve() not in skip
        )
        found.extend(Path(directory) / n for n in names if n.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/dash_shampoo``, or ``~/.cache/dash_shampoo``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dash_shampoo"


def build_corpus(cache_dir: Path | str | None = None) -> Path:
    """Assemble the built-in corpus once and return the path of its cached file.

    The file name carries the Python version and a fingerprint of the file list (paths and sizes),
    so a changed standard library gets a new file. Writing is atomic (temporary file + rename).
    """
    root = stdlib_root()
    files = corpus_files(root)
    if not files:
        raise FileNotFoundError(f"no .py files found under the standard library directory {root}")
    fingerprint = hashlib.sha256()
    for path in files:
        fingerprint.update(f"{path.relative_to(root).as_posix()}:{path.stat().st_size}\n".encode())
    version = "{}.{}.{}".format(*sys.version_info[:3])
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / f"stdlib-py{version}-{fingerprint.hexdigest()[:12]}.txt"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".tmp{os.getpid()}")
    with open(partial, "wb") as out:
        for path in files:
            out.write(f"# ==== {path.relative_to(root).as_posix()} ====\n".encode())
            out.write(path.read_bytes())
            out.write(b"\n")
    os.replace(partial, target)
    return target


def load_corpus(cache_dir: Path | str | None = None, max_bytes: int = DEFAULT_CORPUS_BYTES) -> TokenData:
    """The built-in corpus as byte tokens, capped to its first ``max_bytes`` bytes, split 90/10.

    Raises:
        ValueError: ``max_bytes`` is too small to give both splits something to sample.
    """
    if max_bytes < 1000:
        raise ValueError(f"--corpus-bytes must be at least 1000; got {max_bytes}")
    path = build_corpus(cache_dir)
    raw = path.read_bytes()[:max_bytes]
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    split = int(len(tokens) * TRAIN_FRACTION)
    source = f"Python {sys.version.split()[0]} standard library .py sources, {len(tokens):,} bytes ({path})"
    return TokenData(tokens[:split], tokens[split:], 256, source)


# ----------------------------------------------------------------------------------------------
# nanoGPT .bin files
# ----------------------------------------------------------------------------------------------


def load_bin(directory: Path | str, vocab_size: int) -> TokenData:
    """Memory-map ``directory/train.bin`` and ``directory/val.bin`` (``uint16`` token ids).

    Token ids are checked against ``vocab_size`` batch by batch (:func:`train_batch`), so opening
    a large file costs nothing.

    Raises:
        FileNotFoundError: the directory or one of the files is missing.
        ValueError: a file is empty or has an odd number of bytes, or ``vocab_size`` does not fit
            ``uint16``.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"--data {directory}: no such directory")
    if not 1 <= vocab_size <= 65536:
        raise ValueError(f"--vocab-size must be in [1, 65536] for uint16 .bin files; got {vocab_size}")
    splits = []
    for name in ("train.bin", "val.bin"):
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(
                f"--data {directory}: missing {name} (expected train.bin and val.bin of uint16 token ids)"
            )
        size = path.stat().st_size
        if size == 0 or size % 2:
            raise ValueError(
                f"--data {directory}: {name} has {size} bytes; a file of uint16 token ids needs an even, "
                "non-zero byte count"
            )
        splits.append(torch.from_file(str(path), shared=False, size=size // 2, dtype=torch.uint16))
    source = f"{directory} (uint16 .bin, {len(splits[0]):,} train / {len(splits[1]):,} val tokens)"
    return TokenData(splits[0], splits[1], vocab_size, source)


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------


def check_length(tokens: torch.Tensor, seq_len: int, split: str) -> None:
    """Raise ``ValueError`` if ``tokens`` cannot hold one window of ``seq_len + 1`` tokens."""
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"the {split} split has {len(tokens)} tokens, fewer than --seq-len + 1 = {seq_len + 1}; "
            "use more data (--corpus-bytes) or a shorter --seq-len"
        )


def batch_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit generator seed that depends only on ``(seed, step, rank)``."""
    digest = hashlib.blake2b(f"{seed}/{step}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def windows(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int, vocab_size: int) -> torch.Tensor:
    """Rows ``tokens[s : s + seq_len + 1]`` for each start, as ``int64``, with the ids checked."""
    rows = torch.stack([tokens[s : s + seq_len + 1].to(torch.int64) for s in starts.tolist()])
    top = int(rows.max())
    if top >= vocab_size:
        raise ValueError(f"token id {top} in the data is not below --vocab-size {vocab_size}")
    return rows


def train_batch(
    data: TokenData,
    step: int,
    batch_size: int,
    seq_len: int,
    seed: int,
    rank: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets ``(batch_size, seq_len)`` of training step ``step`` on rank ``rank``."""
    generator = torch.Generator().manual_seed(batch_seed(seed, step, rank))
    starts = torch.randint(0, len(data.train) - seq_len, (batch_size,), generator=generator)
    rows = windows(data.train, starts, seq_len, data.vocab_size)
    return rows[:, :-1], rows[:, 1:]


def val_batches(
    data: TokenData, count: int, batch_size: int, seq_len: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` fixed validation batches of windows spaced evenly over the validation split."""
    windows_needed = count * batch_size
    span = len(data.val) - seq_len - 1
    starts = torch.tensor([k * span // max(windows_needed - 1, 1) for k in range(windows_needed)])
    rows = windows(data.val, starts, seq_len, data.vocab_size)
    return [(chunk[:, :-1], chunk[:, 1:]) for chunk in rows.split(batch_size)]

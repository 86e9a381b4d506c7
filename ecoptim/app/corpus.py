"""Embedded real-text corpora for byte-level language-model experiments.

Two public-domain corpora ship inside the package as xz-compressed ASCII
text (see ``ecoptim/app/corpora/README.md`` for provenance and how they are
rebuilt with ``scripts/build_corpus.py``):

* ``"shakespeare"``: 37 plays and 5 poems (~5.05 MB), the main corpus;
* ``"milton"``: Paradise Lost, Paradise Regained, L'Allegro, Il Penseroso,
  Comus and Lycidas (~0.61 MB), a second corpus for fine-tuning experiments.

Text is tokenised as raw bytes (vocabulary of 256).

Train/validation split (fixed and deterministic): the corpus bytes are cut
into consecutive blocks of ``SPLIT_BLOCK_BYTES`` (8 KiB); block ``i`` (counting
from 0 at the start of the file) belongs to the validation split when
``i % SPLIT_PERIOD == SPLIT_PERIOD - 1`` (every 16th block: 15, 31, 47, ...),
otherwise to training.  Each split is the concatenation of its blocks in
corpus order.  Validation is thus 1/16 = 6.25% of the data (slightly less for
Milton, whose length is not a multiple of 128 KiB) spread evenly over all
works, and the two splits are disjoint and together cover every byte.

The user's own text (``load_user_text``: a file, or every file of a folder in sorted order) is split by the
same rule (``split_bytes``), with smaller blocks when the text is under 512 KiB so that validation still
holds at least 4 blocks spread over the text.
"""

from __future__ import annotations

import functools
import lzma
import os
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path

import torch

__all__ = [
    "CORPORA",
    "SPLITS",
    "SPLIT_BLOCK_BYTES",
    "SPLIT_PERIOD",
    "ByteTokenizer",
    "eval_batches",
    "get_batch",
    "load_split",
    "load_text",
    "load_user_text",
    "split_bytes",
]

CORPORA: tuple[str, ...] = ("shakespeare", "milton")
SPLITS: tuple[str, ...] = ("train", "val")
SPLIT_BLOCK_BYTES: int = 8192
SPLIT_PERIOD: int = 16


def _check_name(name: str) -> None:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; valid names: {', '.join(CORPORA)}")


@functools.lru_cache(maxsize=None)
def load_text(name: str) -> bytes:
    """Return the full decompressed text of corpus ``name`` as bytes.

    The data is read from ``ecoptim/app/corpora/<name>.txt.xz`` with
    :mod:`importlib.resources`, so it works from an installed wheel, an
    editable install or a source checkout.  Results are cached.

    Raises:
        ValueError: if ``name`` is not one of :data:`CORPORA`.
    """
    _check_name(name)
    ref = resources.files("ecoptim.app").joinpath("corpora", f"{name}.txt.xz")
    return lzma.decompress(ref.read_bytes())


def load_split(name: str, split: str) -> torch.Tensor:
    """Return the ``"train"`` or ``"val"`` split of a corpus as byte tokens.

    See the module docstring for the split rule.  The result is a new 1-D
    ``torch.uint8`` tensor on the CPU (safe to modify).

    Raises:
        ValueError: for an unknown corpus name or split.
    """
    _check_name(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    train, val = split_bytes(load_text(name))
    return val if split == "val" else train


def split_bytes(text: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``text`` into (train, val) byte tokens (1-D ``torch.uint8``) by the module's block rule.

    Blocks are ``SPLIT_BLOCK_BYTES`` long, or ``len(text) // (4 * SPLIT_PERIOD)`` (at least 1) for a text under
    ``4 * SPLIT_PERIOD * SPLIT_BLOCK_BYTES`` bytes, so every text has validation blocks spread over all of it.
    Deterministic: the same bytes always give the same split.
    """
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8) if text else torch.empty(0, dtype=torch.uint8)
    block_bytes = SPLIT_BLOCK_BYTES
    if len(text) < 4 * SPLIT_PERIOD * SPLIT_BLOCK_BYTES:
        block_bytes = max(1, len(text) // (4 * SPLIT_PERIOD))
    block = torch.arange(data.numel()) // block_bytes
    is_val = block % SPLIT_PERIOD == SPLIT_PERIOD - 1
    return data[~is_val], data[is_val]


def load_user_text(path: str | os.PathLike) -> bytes:
    """The bytes of a text file, or of every non-hidden file under a folder (recursively, in sorted relative-path
    order, joined by a newline), for training on one's own data.

    Raises:
        ValueError: if ``path`` does not exist, or a folder holds no readable non-empty file.
    """
    root = Path(path)
    if root.is_file():
        return root.read_bytes()
    if not root.is_dir():
        raise ValueError(f"--text {str(root)!r} does not exist; give a text file or a folder of text files")
    files = sorted((p for p in root.rglob("*") if p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(root).parts)),
                   key=lambda p: p.relative_to(root).as_posix())
    parts = [p.read_bytes() for p in files]
    parts = [b for b in parts if b]
    if not parts:
        raise ValueError(f"--text folder {str(root)!r} holds no non-empty files")
    return b"\n".join(parts)


class ByteTokenizer:
    """Byte-level tokenizer: UTF-8 bytes are the tokens (ids 0..255)."""

    vocab_size: int = 256

    def encode(self, text: str) -> torch.Tensor:
        """Encode ``text`` as a 1-D ``torch.long`` tensor of its UTF-8 bytes."""
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)

    def decode(self, tokens: torch.Tensor | Sequence[int]) -> str:
        """Decode byte ids back to text; invalid UTF-8 becomes U+FFFD.

        Raises:
            ValueError: if an id is outside ``0..255``.
        """
        ids = tokens.flatten().tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        try:
            raw = bytes(ids)
        except ValueError as exc:
            raise ValueError("token ids must be in range 0..255") from exc
        return raw.decode("utf-8", errors="replace")


def _check_sizes(data: torch.Tensor, batch_size: int, seq_len: int) -> None:
    if data.dim() != 1:
        raise ValueError(f"data must be 1-D, got shape {tuple(data.shape)}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError("batch_size and seq_len must be positive")
    if data.numel() < seq_len + 1:
        raise ValueError(f"data has {data.numel()} tokens, need at least seq_len + 1 = {seq_len + 1}")


def get_batch(
    data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample a random training batch of next-token-prediction windows.

    ``batch_size`` start offsets are drawn uniformly (with replacement) from
    ``[0, len(data) - seq_len - 1]`` using ``generator`` (a CPU generator), so
    equal seeds give equal batches.  Returns ``(x, y)``, both ``torch.long``
    of shape ``(batch_size, seq_len)`` on ``data.device``, with
    ``x[b] = data[o:o+seq_len]`` and ``y[b] = data[o+1:o+seq_len+1]``.

    Raises:
        ValueError: if ``data`` is not 1-D, sizes are not positive, or
            ``data`` is shorter than ``seq_len + 1``.
    """
    _check_sizes(data, batch_size, seq_len)
    offsets = torch.randint(
        0, data.numel() - seq_len, (batch_size,), generator=generator, device=generator.device
    )
    idx = offsets.to(data.device)[:, None] + torch.arange(seq_len + 1, device=data.device)
    window = data[idx].long()
    return window[:, :-1], window[:, 1:]


def eval_batches(
    data: torch.Tensor, batch_size: int, seq_len: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield deterministic, non-overlapping ``(x, y)`` batches for evaluation.

    ``data`` is viewed as ``n = (len(data) - 1) // seq_len`` consecutive
    windows (window ``k`` has ``x = data[k*seq_len : (k+1)*seq_len]`` and
    ``y`` shifted by one), so no target token is scored twice.  Only full
    batches are yielded: ``m = min(n // batch_size, max_batches)`` batches of
    ``batch_size`` windows each (``max_batches=None`` means no limit).  If
    ``m * batch_size == n`` this is every window in order; otherwise the
    windows used are spread evenly over the whole of ``data`` (window indices
    ``(j * n) // (m * batch_size)``), so a capped evaluation still samples all
    of the validation data rather than just its beginning.  Tensors are
    ``torch.long`` of shape ``(batch_size, seq_len)`` on ``data.device``.

    Raises:
        ValueError: if sizes are not positive, ``max_batches < 1``, or
            ``data`` holds fewer than ``batch_size`` windows.
    """
    _check_sizes(data, batch_size, seq_len)
    if max_batches is not None and max_batches < 1:
        raise ValueError("max_batches must be positive or None")
    n_windows = (data.numel() - 1) // seq_len
    n_batches = n_windows // batch_size
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    if n_batches == 0:
        raise ValueError(
            f"data has {n_windows} windows of seq_len {seq_len}, fewer than batch_size {batch_size}"
        )
    n_used = n_batches * batch_size
    window_ids = (torch.arange(n_used) * n_windows) // n_used
    span = torch.arange(seq_len + 1)
    for b in range(n_batches):
        starts = window_ids[b * batch_size : (b + 1) * batch_size] * seq_len
        window = data[(starts[:, None] + span).to(data.device)].long()
        yield window[:, :-1], window[:, 1:]

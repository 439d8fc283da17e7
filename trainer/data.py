"""Training text that exists offline on every machine: the Python standard library's own source."""

from __future__ import annotations

import pathlib
import sysconfig

import torch

DEFAULT_CORPUS_BYTES = 4_000_000


class CorpusError(RuntimeError):
    """No usable training text was found."""


def stdlib_source_bytes(limit: int = DEFAULT_CORPUS_BYTES) -> bytes:
    """Up to ``limit`` bytes of the standard library's ``.py`` files, in a fixed order."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    chunks: list[bytes] = []
    size = 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            text = path.read_bytes()
        except OSError:
            continue
        chunks.append(text)
        size += len(text)
        if size >= limit:
            break
    corpus = b"".join(chunks)[:limit]
    if len(corpus) < 10_000:
        raise CorpusError(f"found only {len(corpus)} bytes of Python source under {root}")
    return corpus


class RandomWindows:
    """Batches of random (input, next-byte target) windows; each rank draws its own."""

    def __init__(self, corpus: bytes, context: int, batch_size: int, seed: int) -> None:
        self.data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8)
        self.context = context
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(
            len(self.data) - self.context - 1, (self.batch_size,), generator=self.generator
        )
        offsets = torch.arange(self.context + 1)
        windows = self.data[starts[:, None] + offsets].long()
        return windows[:, :-1], windows[:, 1:]

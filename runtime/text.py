"""Text tokenizers: a byte-level one that needs no download, and a plug-in point for others.

Every tokenizer turns a string into a fixed-length row of token ids and back. Id 0 is always
padding: the text input kind, the captioning loss (``next_token(pad=0)``) and attention masks all
rely on it.

Plug-in: ``load_tokenizer("package.module:Name")`` imports ``package.module`` and takes its
attribute ``Name``; a class (or any callable) is called with no arguments, anything else is used
as it is. The result must provide what ``Tokenizer`` lists, with ``pad_id == 0``.
"""
from __future__ import annotations

import importlib
from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

__all__ = ["Tokenizer", "ByteTokenizer", "load_tokenizer", "encode_batch"]


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of the runtime needs from a tokenizer."""

    pad_id: int  # must be 0
    bos_id: int  # starts every encoded text; a caption decoder is primed with it
    eos_id: int  # ends every encoded text; generation stops at it

    @property
    def vocab_size(self) -> int:
        """Number of distinct ids, specials included (the size of the embedding table)."""
        ...

    def encode(self, text: str, length: int) -> Tensor:
        """``text`` as a long tensor of exactly ``length`` ids, padded with ``pad_id``."""
        ...

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        """The text of ``ids``, without special tokens, up to the first ``eos_id``."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: 0 = pad, 1 = BOS, 2 = EOS, byte b -> id b + 3 (259 ids in all).

    Any text encodes without an unknown token and without a vocabulary file, at the cost of long
    sequences (one id per byte; non-ASCII characters take 2-4).

    ``encode`` gives BOS, the bytes, EOS, then padding. Text that does not fit is cut so that EOS is
    always kept (the model always sees where a text ends, so a caption decoder learns to stop), and
    the cut never splits a multi-byte character, so ``decode(encode(t, n))`` is a prefix of ``t``.
    """

    pad_id = 0
    bos_id = 1
    eos_id = 2
    offset = 3

    @property
    def vocab_size(self) -> int:
        return 256 + self.offset

    def encode(self, text: str, length: int) -> Tensor:
        if length < 2:
            raise ValueError(f"length must be at least 2 (room for BOS and EOS), got {length}")
        data = text.encode("utf-8")
        cut = min(len(data), length - 2)
        while 0 < cut < len(data) and (data[cut] & 0xC0) == 0x80:  # inside a character: back off
            cut -= 1
        ids = [self.bos_id] + [b + self.offset for b in data[:cut]] + [self.eos_id]
        ids += [self.pad_id] * (length - len(ids))
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        data = bytearray()
        for i in ids:
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            if not self.offset <= i < self.vocab_size:
                raise ValueError(f"id {i} is outside the byte tokenizer's vocabulary of {self.vocab_size}")
            data.append(i - self.offset)
        # a generated sequence may hold invalid UTF-8; show it rather than fail
        return data.decode("utf-8", errors="replace")


def encode_batch(tokenizer: Tokenizer, texts: Sequence[str], length: int) -> Tensor:
    """Encode several texts into one long tensor [len(texts), length]."""
    return torch.stack([tokenizer.encode(t, length) for t in texts])


def load_tokenizer(name: str) -> Tokenizer:
    """The tokenizer a spec names: ``"byte"``, or ``"module:attr"`` for a user-supplied one."""
    if name == "byte":
        return ByteTokenizer()
    if ":" not in name:
        raise ValueError(f"unknown tokenizer {name!r}: use 'byte' or 'module:attr' to import your own")
    module_name, attr = name.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"tokenizer {name!r}: cannot import module {module_name!r} ({err})") from err
    if not hasattr(module, attr):
        raise ValueError(f"tokenizer {name!r}: module {module_name!r} has no attribute {attr!r}")
    found = getattr(module, attr)
    tokenizer = found() if callable(found) else found
    if not isinstance(tokenizer, Tokenizer):
        raise ValueError(
            f"tokenizer {name!r} lacks part of the Tokenizer interface "
            "(pad_id, bos_id, eos_id, vocab_size, encode, decode)"
        )
    if tokenizer.pad_id != 0:
        raise ValueError(f"tokenizer {name!r} uses pad id {tokenizer.pad_id}; padding must be id 0")
    return tokenizer

"""Bytes are the tokens: vocab 256, with BOS 254 and EOS 255 (bytes that never occur in UTF-8)."""

from __future__ import annotations

VOCAB_SIZE = 256
BOS = 254
EOS = 255


class ByteTokenizer:
    vocab_size = VOCAB_SIZE
    bos_id = BOS
    eos_id = EOS

    def encode(self, text: str | bytes, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return ([BOS] if add_bos else []) + list(data) + ([EOS] if add_eos else [])

    def decode(self, ids, errors: str = "replace") -> str:
        """Text of the ids, BOS/EOS dropped; invalid UTF-8 is replaced unless ``errors="strict"``."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def decode_bytes(self, ids) -> bytes:
        return bytes(int(i) for i in ids if int(i) not in (BOS, EOS))

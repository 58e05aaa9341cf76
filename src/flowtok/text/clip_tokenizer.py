"""The CLIP byte-level BPE tokenizer, offline, from the bundled merge list.

``flowtok/assets/bpe_simple_vocab_16e6.txt.gz`` is OpenAI CLIP's merge list (MIT, see
``assets/LICENSE-clip-bpe.txt``). The vocabulary is derived from it the way CLIP does: the 256
byte symbols, the same with the end-of-word marker ``</w>``, the first 48,894 merges, then
``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407): 49,408 ids in all.

Ids equal open_clip's ``SimpleTokenizer`` (the tokenizer upstream FlowTok trains with) on every
position, padding included: ``[SOT] + bpe(clean(text)) + [EOT]``, padded with **0** to the context
length; an over-long caption keeps its first ``L - 1`` ids and ends in EOT. (transformers'
``CLIPTokenizer`` pads with EOT instead; the CLIP text tower is causal, so the content states do not
depend on the pad id, but the pad states do, so we follow open_clip.) Differences, on purpose: the
special-token strings typed inside a caption are ordinary text here, never control tokens.

We never call ``CLIPTokenizer.from_pretrained(<hub id>)``: offline it silently returns a broken
two-token tokenizer. :meth:`ClipBPETokenizer.save_vocab_files` writes ``vocab.json`` + ``merges.txt``
so that transformers' tokenizer classes can be built from local files when someone needs them.
"""

from __future__ import annotations

import gzip
import html
import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

import regex

from ..errors import CheckpointError

BUNDLED_VOCAB = "bpe_simple_vocab_16e6.txt.gz"
SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of the 16e6 list

# Contractions, runs of letters, single digits, runs of other non-space symbols (CLIP's split).
_SPLIT = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)
# Undo the " ." / " 's" spacing that the end-of-word markers put into decoded text.
_DETOK = [(" .", "."), (" ,", ","), (" !", "!"), (" ?", "?"), (" ;", ";"), (" :", ":"),
          (" n't", "n't"), (" 't", "'t"), (" 's", "'s"), (" 're", "'re"), (" 've", "'ve"), (" 'm", "'m"),
          (" 'll", "'ll"), (" 'd", "'d"), (" ' ", "'")]
_DIGITS = regex.compile(r"(?<=\d) (?=\d)")


@lru_cache(maxsize=1)
def byte_symbols() -> dict[int, str]:
    """Byte -> printable unicode character, so that BPE never sees whitespace or control bytes.

    Printable Latin-1 bytes map to themselves; the 68 others map to chr(256 + k) in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table  # insertion order (printable first) is the vocabulary order


def clean_caption(text: str) -> str:
    """CLIP's 'lower' cleaning: fix mojibake, unescape HTML twice, collapse whitespace, lowercase."""
    import ftfy  # only the CLIP path needs it; importing flowtok.text must not

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


def detokenize(text: str) -> str:
    text = " ".join(text.split())
    # CLIP splits numbers into single digits; a decoded "4 2" was almost always "42"
    text = _DIGITS.sub("", text)
    for old, new in _DETOK:
        text = text.replace(old, new)
    return text.strip()


class ClipBPETokenizer:
    """CLIP BPE: ``encode`` text to content ids, ``__call__`` to padded rows, ``decode`` ids to text."""

    pad_token_id = 0  # open_clip pads with 0 (the id of '!'); the mask tells pads apart

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
        self.vocab = vocab
        self.id_to_token = {i: t for t, i in vocab.items()}
        self.ranks = {pair: r for r, pair in enumerate(merges)}
        self.merges = merges
        self.byte_to_sym = byte_symbols()
        self.sym_to_byte = {s: b for b, s in self.byte_to_sym.items()}
        if SOT not in vocab or EOT not in vocab:
            raise CheckpointError("CLIP vocabulary lacks <|startoftext|> / <|endoftext|>")
        self.sot_token_id = vocab[SOT]
        self.eot_token_id = vocab[EOT]
        self._word_cache: dict[str, list[str]] = {}

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_merges(cls, merges: list[tuple[str, str]]) -> ClipBPETokenizer:
        symbols = list(byte_symbols().values())
        tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        return cls({t: i for i, t in enumerate(tokens)}, merges)

    @classmethod
    def from_gz(cls, path: str | os.PathLike) -> ClipBPETokenizer:
        """Read a ``bpe_simple_vocab_16e6.txt.gz``-style file (a header line, then one merge a line)."""
        try:
            lines = gzip.open(path).read().decode("utf-8").split("\n")
        except OSError as exc:
            raise CheckpointError(f"cannot read CLIP BPE file {path}: {exc}") from None
        merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
        return cls.from_merges(merges)  # type: ignore[arg-type]

    @classmethod
    def bundled(cls) -> ClipBPETokenizer:
        return _bundled()

    @classmethod
    def from_files(cls, vocab_json: str | os.PathLike, merges_txt: str | os.PathLike) -> ClipBPETokenizer:
        """Build from the ``vocab.json`` + ``merges.txt`` of a Hugging Face CLIP folder."""
        try:
            vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
            lines = Path(merges_txt).read_text(encoding="utf-8").split("\n")
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read CLIP tokenizer files: {exc}") from None
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        return cls(vocab, merges)  # type: ignore[arg-type]

    def save_vocab_files(self, directory: str | os.PathLike) -> None:
        """Write ``vocab.json`` and ``merges.txt`` (the layout transformers' CLIPTokenizer reads)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        body = "\n".join(f"{a} {b}" for a, b in self.merges)
        (directory / "merges.txt").write_text("#version: 0.2\n" + body + "\n", encoding="utf-8")

    # -- encoding -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def _bpe(self, word: str) -> list[str]:
        cached = self._word_cache.get(word)
        if cached is not None:
            return cached
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            ranked = [(self.ranks.get(pair, -1), k) for k, pair in enumerate(zip(parts, parts[1:]))]
            ranked = [(r, k) for r, k in ranked if r >= 0]
            if not ranked:
                break
            first, second = parts[min(ranked)[1]], parts[min(ranked)[1] + 1]
            merged: list[str] = []
            k = 0
            # Every non-overlapping occurrence of the best pair merges in the same pass, left to right.
            while k < len(parts):
                if k + 1 < len(parts) and parts[k] == first and parts[k + 1] == second:
                    merged.append(first + second)
                    k += 2
                else:
                    merged.append(parts[k])
                    k += 1
            parts = merged
        if len(self._word_cache) > 200_000:
            self._word_cache.clear()
        self._word_cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        """Content ids of one caption, without SOT/EOT and without truncation."""
        ids: list[int] = []
        for piece in _SPLIT.findall(clean_caption(text)):
            word = "".join(self.byte_to_sym[b] for b in piece.encode("utf-8"))
            ids.extend(self.vocab[t] for t in self._bpe(word))
        return ids

    def __call__(self, texts: list[str], context_length: int = 77) -> list[list[int]]:
        """Rows of exactly ``context_length`` ids: SOT, content, EOT, zeros (open_clip's layout)."""
        rows = []
        for text in texts:
            row = [self.sot_token_id, *self.encode(text)][: context_length - 1] + [self.eot_token_id]
            rows.append(row + [self.pad_token_id] * (context_length - len(row)))
        return rows

    def decode(self, ids: list[int], clean_up: bool = True) -> str:
        """Text of ``ids`` up to the first EOT, without SOT; unknown ids skipped, broken UTF-8 replaced."""
        ids = [int(i) for i in ids]
        if self.eot_token_id in ids:
            ids = ids[: ids.index(self.eot_token_id)]
        syms = "".join(self.id_to_token.get(i, "") for i in ids if i != self.sot_token_id)
        raw = bytes(self.sym_to_byte[c] for c in syms if c in self.sym_to_byte)
        text = raw.decode("utf-8", errors="replace").replace("</w>", " ")
        # '</w>' is made of byte symbols too, so it survives the byte mapping above unchanged
        return detokenize(text) if clean_up else " ".join(text.split())


@lru_cache(maxsize=1)
def _bundled() -> ClipBPETokenizer:
    path = resources.files("flowtok").joinpath("assets", BUNDLED_VOCAB)
    with resources.as_file(path) as p:
        return ClipBPETokenizer.from_gz(p)

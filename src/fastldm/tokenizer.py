"""CLIP byte-level BPE tokenizer and A1111 prompt weighting.

The tokenizer is CLIP's (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", Sec. 2.4): GPT-2 byte-level BPE (Sennrich et al. 2016; Radford et al. 2019) over lower-cased text,
words marked with an "</w>" suffix, 49,408 ids, `<|startoftext|>` = 49406, `<|endoftext|>` = 49407. It runs on the
`tokenizers` library; the vocabulary is the MIT-licensed `bpe_simple_vocab_16e6.txt.gz` bundled in `assets/`
(see assets/LICENSE-clip-vocab.txt), or a diffusers model's own `tokenizer/` folder.

Text cleaning is NFC + whitespace collapse + lower-case, exactly as transformers >= 5 `CLIPTokenizer` (what diffusers
feeds its text encoders). Intentional differences, both documented in tests/test_tokenizer.py:
  * open_clip / A1111 also run ftfy and `html.unescape`, so a prompt with `&amp;` or mojibake can tokenize
    differently there; we do neither (like transformers).
  * transformers registers the pad token as a special token, so a folder padding with "!" (SD2, SDXL tokenizer_2)
    turns every "!" in a prompt into id 0. We treat "!" as text (as open_clip, which those encoders were trained
    with): the pad token only pads.

Prompt weighting follows AUTOMATIC1111's stable-diffusion-webui (`modules/prompt_parser.py`
`parse_prompt_attention`, `modules/sd_hijack_clip.py` chunking, `modules/sd_emphasis.py` "Original" emphasis).
"""

from __future__ import annotations

import gzip
import json
import re
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

CONTEXT_LENGTH = 77  # BOS + 75 tokens + EOS: CLIP's positional-embedding table
CHUNK_LENGTH = CONTEXT_LENGTH - 2
COMMA_BACKTRACK = 20  # A1111 `comma_padding_backtrack`: break a full chunk at a comma within its last 20 tokens
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BREAK = ("BREAK", -1.0)  # parse_prompt_attention's chunk-break marker (A1111's convention)

# CLIP's pre-tokenization: contractions, letter runs, single digits, runs of other non-space characters.
_CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# CLIP reads the first 49152 - 256 - 2 lines after the header: vocab = 256 bytes + 256 bytes</w> + merges + 2 specials.
_BUNDLED_MERGES = 49152 - 256 - 2


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> visible character table (Radford et al. 2019), in vocabulary order: the 188 printable
    Latin-1 bytes stand for themselves, the other 68 bytes become chr(256), chr(257), ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def _token_content(value) -> str | None:
    """A token in special_tokens_map.json / tokenizer_config.json is a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


class CLIPTokenizer:
    """CLIP BPE tokenizer with fixed 77-token windows and A1111-style weighted, chunked encoding.

    `pad_id` is what fills a window after EOS: 49407 (`<|endoftext|>`, SD1 and SDXL's first encoder) or 0
    (`!`, SD2 and SDXL's OpenCLIP encoder).
    """

    context_length = CONTEXT_LENGTH

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str,
                 bos_token: str = BOS_TOKEN, eos_token: str = EOS_TOKEN):
        for token in (bos_token, eos_token, pad_token):
            if token not in vocab:
                raise ValueError(
                    f"token {token!r} is not in the vocabulary; check the tokenizer folder's special tokens")
        self._vocab = vocab
        self._merges = merges
        self.bos_id, self.eos_id, self.pad_id = vocab[bos_token], vocab[eos_token], vocab[pad_token]
        self._comma_id = vocab.get(",</w>")

        bpe = BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", continuing_subword_prefix="",
                  unk_token=eos_token, fuse_unk=False)
        tokenizer = Tokenizer(bpe)
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),  # keep matches, drop spaces
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> visible characters
        ])
        # BOS/EOS typed verbatim in a prompt map to their ids (as in transformers); the pad token does not.
        tokenizer.add_special_tokens([bos_token, eos_token])
        self._tokenizer = tokenizer

    @classmethod
    def bundled(cls, pad_id: int = 49407) -> CLIPTokenizer:
        """The CLIP vocabulary shipped with fastldm; pad with `pad_id` (49407 for SD1, 0 for SD2/OpenCLIP).
        Builds in ~0.1 s; nothing is cached."""
        with resources.files("fastldm").joinpath("assets/bpe_simple_vocab_16e6.txt.gz").open("rb") as f:
            lines = gzip.decompress(f.read()).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:1 + _BUNDLED_MERGES]]
        alphabet = _byte_alphabet()
        tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
        vocab = {token: i for i, token in enumerate(tokens)}
        if not 0 <= pad_id < len(tokens):
            raise ValueError(f"pad_id {pad_id} is outside the vocabulary (0..{len(tokens) - 1}); use 49407 or 0")
        return cls(vocab, merges, pad_token=tokens[pad_id])

    @classmethod
    def from_folder(cls, path) -> CLIPTokenizer:
        """Load a transformers/diffusers tokenizer folder: vocab.json + merges.txt, or the tokenizer.json that
        transformers >= 5 writes alone; special tokens from special_tokens_map.json / tokenizer_config.json
        (special_tokens_map.json wins, as in transformers)."""
        path = Path(path)
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
            lines = (path / "merges.txt").read_text(encoding="utf-8").split("\n")
            merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        elif (path / "tokenizer.json").is_file():
            model = json.loads((path / "tokenizer.json").read_text(encoding="utf-8")).get("model", {})
            if model.get("type") != "BPE":
                raise ValueError(f"{path}/tokenizer.json is not a BPE tokenizer; CLIP models need one")
            vocab = model["vocab"]
            merges = [tuple(m.split() if isinstance(m, str) else m) for m in model["merges"]]
        else:
            raise FileNotFoundError(f"{path} has no vocab.json + merges.txt nor tokenizer.json; pass a model's "
                                    f"tokenizer/ or tokenizer_2/ folder")
        special = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # later files override earlier ones
            if (path / name).is_file():
                config = json.loads((path / name).read_text(encoding="utf-8"))
                for key in ("bos_token", "eos_token", "pad_token"):
                    if _token_content(config.get(key)) is not None:
                        special[key] = _token_content(config[key])
        return cls(vocab, merges, pad_token=special.get("pad_token", EOS_TOKEN),
                   bos_token=special.get("bos_token", BOS_TOKEN), eos_token=special.get("eos_token", EOS_TOKEN))

    def save(self, path) -> None:
        """Write a transformers-compatible folder (`CLIPTokenizer.from_pretrained(path)` gives the same ids)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        token = self._tokenizer.id_to_token
        (path / "vocab.json").write_text(json.dumps(self._vocab, ensure_ascii=False), encoding="utf-8")
        (path / "merges.txt").write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self._merges), encoding="utf-8")
        special = {"bos_token": token(self.bos_id), "eos_token": token(self.eos_id),
                   "unk_token": token(self.eos_id), "pad_token": token(self.pad_id)}
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": CONTEXT_LENGTH, "do_lower_case": True,
                  "errors": "replace", "add_prefix_space": False, **special}
        (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS and without truncation."""
        return self._tokenizer.encode(text).ids

    def __call__(self, texts: list[str]) -> torch.LongTensor:
        """(B, 77) ids: BOS + ids + EOS + pad, cut to 75 text tokens (the last id stays EOS) — what diffusers'
        pipelines feed the text encoder (transformers `truncation=True, padding="max_length"`)."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), CONTEXT_LENGTH), self.pad_id, dtype=torch.long)
        for row, text in zip(out, texts):
            ids = [self.bos_id, *self.encode(text)[:CHUNK_LENGTH], self.eos_id]
            row[:len(ids)] = torch.tensor(ids)
        return out

    def encode_weighted(self, prompt: str) -> tuple[torch.LongTensor, torch.FloatTensor]:
        """(n_chunks, 77) ids and (n_chunks, 77) weights of an A1111-syntax prompt (see `parse_prompt_attention`).

        As A1111 `FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line`: tokens are packed into 75-token chunks;
        when a chunk is full and a comma lies within its last `COMMA_BACKTRACK` tokens, the tokens after that comma
        move to the next chunk; BREAK starts a new chunk; an empty prompt gives one chunk. Each chunk is
        BOS + tokens + EOS + pad; BOS/EOS/pad weigh 1.0. Encode each chunk separately and concatenate along the
        sequence axis (A1111 and ComfyUI do), applying `apply_weights` per chunk.
        """
        chunks: list[tuple[list[int], list[float]]] = []
        ids: list[int] = []
        weights: list[float] = []
        last_comma = -1  # index in `ids` of the last comma of the current chunk

        def close_chunk() -> None:
            nonlocal ids, weights, last_comma
            chunks.append((ids, weights))
            ids, weights, last_comma = [], [], -1

        for text, weight in parse_prompt_attention(prompt):
            if (text, weight) == BREAK:
                close_chunk()
                continue
            for token in self.encode(text):
                if token == self._comma_id:
                    last_comma = len(ids)
                elif len(ids) == CHUNK_LENGTH and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK:
                    moved_ids, moved_weights = ids[last_comma + 1:], weights[last_comma + 1:]
                    del ids[last_comma + 1:], weights[last_comma + 1:]
                    close_chunk()
                    ids, weights = moved_ids, moved_weights
                if len(ids) == CHUNK_LENGTH:
                    close_chunk()
                ids.append(token)
                weights.append(weight)
        if ids or not chunks:
            close_chunk()

        all_ids = torch.full((len(chunks), CONTEXT_LENGTH), self.pad_id, dtype=torch.long)
        all_weights = torch.ones(len(chunks), CONTEXT_LENGTH)
        for i, (chunk_ids, chunk_weights) in enumerate(chunks):
            n = len(chunk_ids)
            all_ids[i, :n + 2] = torch.tensor([self.bos_id, *chunk_ids, self.eos_id])
            all_weights[i, 1:n + 1] = torch.tensor(chunk_weights)
        return all_ids, all_weights


# One lexical unit of A1111's attention syntax per match; group 1 is an explicit weight.
_ATTENTION_TOKEN = re.compile(r"""
      \\[()\[\]\\]                                 # escaped bracket or backslash: that character, literally
    | \\                                           # a lone backslash is dropped
    | [(\[]                                        # open a bracket
    | :\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)          # ':1.3)' closes the innermost '(' with weight 1.3
    | [)\]]                                        # close a bracket
    | [^\\()\[\]:]+                                # plain text
    | :                                            # a colon that is not part of a weight
""", re.VERBOSE)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")
_ROUND, _SQUARE = 1.1, 1 / 1.1


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split an A1111 prompt into (text, weight) pieces.

    `(abc)` multiplies by 1.1, `[abc]` divides by 1.1, `(abc:1.3)` multiplies by 1.3; nesting multiplies;
    `\\( \\) \\[ \\] \\\\` are literal characters; brackets left open close at the end of the prompt; consecutive
    pieces of equal weight merge. "BREAK" (upper case, a word of its own) gives the `BREAK` marker ("BREAK", -1.0).

    >>> parse_prompt_attention("a (very beautiful:1.3) [dog], ((sky)")
    [('a ', 1.0), ('very beautiful', 1.3), (' ', 1.0), ('dog', 0.9090909090909091), (', ', 1.0), ('sky', 1.2100000000000002)]

    Differences from A1111, on purpose: a BREAK inside brackets still breaks (A1111 scales its marker and then
    types "BREAK" as text), and a malformed weight such as `(a:1.2.3)` is text instead of an exception.
    [from:to:when] prompt editing and AND composition are not handled here.
    """
    pieces: list[list] = []  # [text, weight]; a BREAK marker is the list [*BREAK]
    open_round: list[int] = []  # index in `pieces` where each open '(' starts
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if tuple(piece) != BREAK:
                piece[1] *= factor

    for match in _ATTENTION_TOKEN.finditer(text):
        unit, weight = match.group(0), match.group(1)
        if unit.startswith("\\"):
            pieces.append([unit[1:], 1.0])
        elif unit == "(":
            open_round.append(len(pieces))
        elif unit == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            scale(open_round.pop(), float(weight))
        elif unit == ")" and open_round:
            scale(open_round.pop(), _ROUND)
        elif unit == "]" and open_square:
            scale(open_square.pop(), _SQUARE)
        else:  # plain text, or a bracket/weight with nothing to close
            for i, part in enumerate(_BREAK_WORD.split(unit)):
                if i > 0:
                    pieces.append(list(BREAK))
                pieces.append([part, 1.0])
    for start in open_round:
        scale(start, _ROUND)
    for start in open_square:
        scale(start, _SQUARE)

    merged: list[tuple[str, float]] = []
    for piece_text, weight in pieces:
        if merged and merged[-1][1] == weight and BREAK not in (merged[-1], (piece_text, weight)):
            merged[-1] = (merged[-1][0] + piece_text, weight)
        else:
            merged.append((piece_text, weight))
    return merged or [("", 1.0)]


def apply_weights(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111 "Original" emphasis (`modules/sd_emphasis.py` `EmphasisOriginal`): scale each token's embedding by
    its weight, then rescale so each batch item's mean over (N, D) equals its unweighted mean.

    z: (B, N, D) text-encoder output; weights: (B, N). A1111 rescales one 77-token chunk at a time, so pass the
    encoder output of `encode_weighted`'s chunks, (n_chunks, 77, D), before concatenating them.
    """
    if z.ndim != 3 or weights.shape != z.shape[:2]:
        raise ValueError(
            f"apply_weights needs z (B, N, D) and weights (B, N); got {tuple(z.shape)} and {tuple(weights.shape)}")
    z32 = z.float()
    original_mean = z32.mean(dim=(1, 2), keepdim=True)  # (B, 1, 1)
    weighted = z32 * weights.to(z32)[:, :, None]  # (B, N, D)
    return (weighted * (original_mean / weighted.mean(dim=(1, 2), keepdim=True))).to(z.dtype)

"""CLIP tokenizer and A1111 prompt weighting.

Oracle: transformers' CLIPTokenizer (v5: `tokenizers`-backed, no ftfy, no html.unescape — the same cleaning as ours,
so ids compare apples to apples) loaded from folders that this test builds itself from the bundled gz file with
transformers' own byte table, independently of `CLIPTokenizer.save`.
"""

import gzip
import hashlib
import json
import time
from importlib import resources

import pytest
import torch

from fastldm.tokenizer import BREAK, CLIPTokenizer, apply_weights, parse_prompt_attention

transformers = pytest.importorskip("transformers")

ASSETS = resources.files("fastldm") / "assets"
GZ_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"  # open_clip_torch 3.3.0 wheel

CORPUS = [
    "a photo of an astronaut riding a horse on mars",
    "A painting of a squirrel eating a burger",
    "Café crème brûlée, naïve façade, jalapeño",
    "東京の夜景、ネオンが光る",
    "一只猫在月球上",
    "한국어 프롬프트 테스트",
    "Ελληνικά και русский текст, ß straße ΣΊΣΥΦΟΣ",
    "עברית وعربية",
    "emoji 🐱🚀✨ and a family 👩‍👩‍👧",
    "Hello, World!!! How's it going?",
    "it's, don't, we're, they've, I'm, you'll, he'd, IT'S, DON'T",
    "rock'n'roll 'quoted' \"double\" ‘curly’ “curly”",
    "The year 2024 had 365 days; pi ≈ 3.14159",
    "math: x² + y² = z², ½ ¾ ⅓",
    "   leading and trailing   spaces   ",
    "tabs\tand\nnewlines\r\nmixed\u00a0nbsp\u3000ideographic space",
    "zero\u200bwidth space and soft\u00adhyphen, bell\x07",
    "Tom &amp; Jerry &lt;3 &quot;quoted&quot; &#39;apos&#39; &nbsp;",
    "masterpiece, best quality, (extremely detailed:1.2), [blurry], \\(literal\\)",
    "!!!???...,,,;;;:::",
    "snake_case-and-kebab-case/slashes\\backslashes|pipes",
    "UPPER lower MiXeD CaSe",
    "e\u0301cole (combining accent, NFC) vs école",
    "ﬁne ligature ﬁ and ＦＵＬＬＷＩＤＴＨ",
    "hyphen-ated—em dash – en dash … ellipsis",
    "url https://example.com/path?q=1&x=2#frag",
    "<|startoftext|>explicit specials<|endoftext|> inside",
    "<|ENDOFTEXT|> an upper-case special is text",
    "1girl, solo, long hair, looking at viewer, smile, open mouth",
    "İstanbul ǅ ﬀ",
    "",
    "photo of a cat, " * 40,  # ~240 tokens: truncated by __call__, chunked by encode_weighted
    "an intricately detailed portrait of an elderly fisherman with weathered skin and kind eyes, golden hour "
    "lighting, shallow depth of field, 85mm lens, film grain, award winning photograph, trending on artstation, "
    "octane render, volumetric fog, cinematic composition, highly detailed, sharp focus, 8k uhd",
]


@pytest.fixture(scope="module")
def oracle_dirs(tmp_path_factory):
    """transformers tokenizer folders: SD1 style (pad <|endoftext|>) and SD2 style (pad "!" in
    special_tokens_map.json, <|endoftext|> in tokenizer_config.json, as stabilityai/stable-diffusion-2-1 ships)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    lines = gzip.decompress((ASSETS / "bpe_simple_vocab_16e6.txt.gz").read_bytes()).decode("utf-8").splitlines()
    merges = lines[1:48895]  # CLIP uses 48,894 merges (ecosystem.md 5.1)
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    dirs = {}
    for name, pad in [("sd1", "<|endoftext|>"), ("sd2", "!")]:
        d = tmp_path_factory.mktemp(name)
        (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
        (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
        (d / "special_tokens_map.json").write_text(json.dumps({**specials, "pad_token": pad}))
        (d / "tokenizer_config.json").write_text(json.dumps(
            {**specials, "pad_token": "<|endoftext|>", "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}))
        dirs[name] = d
    return dirs


@pytest.fixture(scope="module")
def oracles(oracle_dirs):
    return {name: transformers.CLIPTokenizer.from_pretrained(str(d)) for name, d in oracle_dirs.items()}


def hf_ids(hf, texts):
    return torch.tensor(hf(texts, padding="max_length", max_length=77, truncation=True).input_ids)


def test_bundled_vocabulary_facts():
    assert hashlib.sha256((ASSETS / "bpe_simple_vocab_16e6.txt.gz").read_bytes()).hexdigest() == GZ_SHA256
    assert "Copyright (c) 2021 OpenAI" in (ASSETS / "LICENSE-clip-vocab.txt").read_text(encoding="utf-8")
    tok = CLIPTokenizer.bundled()
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.context_length) == (49406, 49407, 49407, 77)
    assert CLIPTokenizer.bundled(pad_id=0).pad_id == 0
    # Ids verified against open_clip's SimpleTokenizer (ecosystem.md 5.2).
    assert tok.encode("a photo of an astronaut riding a horse on mars") == [
        320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496]
    assert len(tok.encode("2024")) == 4  # each digit is its own token
    with pytest.raises(ValueError, match="pad_id"):
        CLIPTokenizer.bundled(pad_id=49408)


def test_bundled_builds_fast():
    start = time.perf_counter()
    CLIPTokenizer.bundled()
    assert time.perf_counter() - start < 1.0  # ~0.15 s measured on 2 shared cores; the brief asks well under 1 s


def test_encode_matches_transformers_without_truncation(oracles):
    tok = CLIPTokenizer.bundled()
    for text in CORPUS:
        assert tok.encode(text) == oracles["sd1"](text, add_special_tokens=False).input_ids, text
    assert max(len(tok.encode(text)) for text in CORPUS) >= 200


def test_call_matches_transformers_pad_endoftext(oracles):
    ids = CLIPTokenizer.bundled()(CORPUS)
    assert ids.shape == (len(CORPUS), 77) and ids.dtype == torch.long
    assert torch.equal(ids, hf_ids(oracles["sd1"], CORPUS))
    assert ids[-2, -1] == 49407 and ids[-2, 0] == 49406  # the long prompt is cut with EOS last


def test_call_matches_transformers_pad_zero(oracles):
    """SD2 / SDXL tokenizer_2 convention: pad with "!" = 0. transformers also makes "!" a special token, so a "!"
    typed in a prompt becomes id 0 there; we keep it as text (open_clip's behaviour, which those encoders were
    trained with). Prompts without "!" must match the SD2 oracle exactly; prompts with it match the SD1 oracle's
    text ids with padding 0."""
    ours = CLIPTokenizer.bundled(pad_id=0)(CORPUS)
    plain = [i for i, text in enumerate(CORPUS) if "!" not in text]
    assert len(plain) >= 30
    assert torch.equal(ours[plain], hf_ids(oracles["sd2"], [CORPUS[i] for i in plain]))
    sd1 = hf_ids(oracles["sd1"], CORPUS)
    lengths = torch.tensor([[min(len(oracles["sd1"](t, add_special_tokens=False).input_ids), 75) + 2] for t in CORPUS])
    assert torch.equal(ours, sd1.masked_fill(torch.arange(77) >= lengths, 0))  # lengths: (B, 1) -> mask (B, 77)
    # The documented difference itself: "!" is text for us (id 256 = "!</w>"), the pad token for transformers.
    assert CLIPTokenizer.bundled(pad_id=0).encode("wow!") == [2781, 256]
    assert oracles["sd2"]("wow!", add_special_tokens=False).input_ids == [2781, 0]


def test_html_entities_are_not_unescaped(oracles):
    """Like transformers (and unlike open_clip's basic_clean), "&amp;" stays four characters of text."""
    tok = CLIPTokenizer.bundled()
    assert tok.encode("tom &amp; jerry") != tok.encode("tom & jerry")
    assert tok.encode("tom &amp; jerry") == oracles["sd1"]("tom &amp; jerry", add_special_tokens=False).input_ids


def test_from_folder(oracle_dirs, tmp_path):
    sd1, sd2 = CLIPTokenizer.from_folder(oracle_dirs["sd1"]), CLIPTokenizer.from_folder(oracle_dirs["sd2"])
    assert (sd1.bos_id, sd1.eos_id, sd1.pad_id) == (49406, 49407, 49407)
    assert sd2.pad_id == 0  # special_tokens_map.json ("!") wins over tokenizer_config.json (<|endoftext|>)
    assert torch.equal(sd1(CORPUS), CLIPTokenizer.bundled()(CORPUS))
    assert torch.equal(sd2(CORPUS), CLIPTokenizer.bundled(pad_id=0)(CORPUS))

    # tokenizer_config.json alone, with the pad token in AddedToken form.
    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((oracle_dirs["sd1"] / name).read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": {"content": "!", "special": True}}))
    assert CLIPTokenizer.from_folder(folder).pad_id == 0

    with pytest.raises(FileNotFoundError, match="tokenizer/"):
        CLIPTokenizer.from_folder(tmp_path / "missing")


@pytest.mark.parametrize("pad_id", [49407, 0])
def test_save_round_trip(tmp_path, pad_id):
    tok = CLIPTokenizer.bundled(pad_id=pad_id)
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 77
    hf = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    assert hf.pad_token_id == pad_id
    # With pad "!", transformers turns a typed "!" into the pad id (see test_call_matches_transformers_pad_zero).
    texts = [t for t in CORPUS if pad_id != 0 or "!" not in t]
    assert torch.equal(tok(texts), hf_ids(hf, texts))
    assert torch.equal(CLIPTokenizer.from_folder(tmp_path)(CORPUS), tok(CORPUS))


# ---- chunking (A1111 sd_hijack_clip.py) ----

WORDS = ["cat", "dog", "red", "blue", "tree", "house", "sky", "sun", "moon", "car"]


def words(n, start=0):
    return [WORDS[(start + i) % len(WORDS)] for i in range(n)]


@pytest.fixture(scope="module")
def tok():
    t = CLIPTokenizer.bundled()
    assert all(len(t.encode(w)) == 1 for w in WORDS + [","])  # the arithmetic below counts one token per word
    return t


def expected_chunk(tok, ids, weights=None, pad_id=49407):
    row = [tok.bos_id, *ids, tok.eos_id] + [pad_id] * (75 - len(ids))
    w = [1.0, *(weights or [1.0] * len(ids)), 1.0] + [1.0] * (75 - len(ids))
    return row, w


def check_chunks(got, expected):
    ids, weights = got
    assert ids.tolist() == [row for row, _ in expected]
    torch.testing.assert_close(weights, torch.tensor([w for _, w in expected]), rtol=0, atol=0)


def test_160_tokens_give_three_chunks(tok):
    prompt_words = words(160)
    ids = [tok.encode(w)[0] for w in prompt_words]
    for pad_id in (49407, 0):
        t = CLIPTokenizer.bundled(pad_id=pad_id)
        got = t.encode_weighted(" ".join(prompt_words))
        assert got[0].shape == got[1].shape == (3, 77)
        check_chunks(got, [expected_chunk(t, ids[:75], pad_id=pad_id), expected_chunk(t, ids[75:150], pad_id=pad_id),
                           expected_chunk(t, ids[150:], pad_id=pad_id)])
        assert got[0][2, 11].item() == t.eos_id and got[0][2, 12:].eq(pad_id).all()


def test_exactly_75_tokens_is_one_chunk(tok):
    assert tok.encode_weighted(" ".join(words(75)))[0].shape == (1, 77)
    assert tok.encode_weighted(" ".join(words(76)))[0].shape == (2, 77)


def test_comma_backtracking(tok):
    """70 words, a comma, then 10 words weighted 1.5: the chunk fills at 75 tokens with the comma 5 tokens back
    (<= 20), so the 4 words after the comma move to the second chunk, keeping their weights."""
    first, last = words(70), words(10, start=3)
    got = tok.encode_weighted(" ".join(first) + ", (" + " ".join(last) + ":1.5)")
    first_ids, last_ids = [tok.encode(w)[0] for w in first], [tok.encode(w)[0] for w in last]
    check_chunks(got, [expected_chunk(tok, first_ids + [tok.encode(",")[0]]),
                       expected_chunk(tok, last_ids, [1.5] * 10)])


def test_no_backtracking_when_comma_is_far(tok):
    """Comma at position 40: 75 - 40 > 20, so the chunk is cut at exactly 75 tokens."""
    prompt_ids = [tok.encode(w)[0] for w in words(40)] + [tok.encode(",")[0]] + [tok.encode(w)[0] for w in words(50)]
    got = tok.encode_weighted(" ".join(words(40)) + ", " + " ".join(words(50)))
    check_chunks(got, [expected_chunk(tok, prompt_ids[:75]), expected_chunk(tok, prompt_ids[75:])])


def test_break_and_empty_prompt(tok):
    a_cat, a_dog = tok.encode("a cat"), tok.encode("a dog")
    check_chunks(tok.encode_weighted("a cat BREAK a dog"), [expected_chunk(tok, a_cat), expected_chunk(tok, a_dog)])
    check_chunks(tok.encode_weighted("a cat BREAK"), [expected_chunk(tok, a_cat)])
    assert tok.encode_weighted("a cat break a dog")[0].shape == (1, 77)  # only upper-case BREAK
    assert tok.encode_weighted("BREAKfast")[0].shape == (1, 77)  # only as a word of its own
    check_chunks(tok.encode_weighted(""), [expected_chunk(tok, [])])


def test_weights_follow_tokens(tok):
    ids, weights = tok.encode_weighted("a (very beautiful:1.3) [dog]")
    assert ids[0, :6].tolist() == [tok.bos_id, *tok.encode("a very beautiful dog"), tok.eos_id]
    torch.testing.assert_close(weights[0, :6], torch.tensor([1.0, 1.0, 1.3, 1.3, 1 / 1.1, 1.0]))
    assert weights[0, 6:].eq(1.0).all()


# ---- parse_prompt_attention (cases from A1111's docstring, then edge cases) ----

@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
    ("a (very beautiful:1.3) [dog]", [("a ", 1.0), ("very beautiful", 1.3), (" ", 1.0), ("dog", 1 / 1.1)]),
    ("((a))", [("a", 1.1 * 1.1)]),
    ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
    ("(a : 1.5 ) b", [("a ", 1.5), (" b", 1.0)]),  # the space before ":" is text
    ("(a:0)", [("a", 0.0)]),
    ("a) b] c", [("a) b] c", 1.0)]),  # nothing to close: literal
    ("time: 5:30", [("time: 5:30", 1.0)]),
    ("(a:1.2.3)", [("a:1.2.3", 1.1)]),  # malformed weight is text (A1111 raises)
    ("back\\\\slash", [("back\\slash", 1.0)]),
    ("(a [b) c]", [("a ", 1.1), ("b", 1.0), (" c", 1 / 1.1)]),  # crossing brackets close independently
    ("", [("", 1.0)]),
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),  # BREAK inside brackets still breaks (A1111 does not)
    ("a BREAKfast break", [("a BREAKfast break", 1.0)]),
])
def test_parse_prompt_attention(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)  # float products, same order


# ---- apply_weights (A1111 "Original" emphasis) ----

def test_apply_weights_keeps_mean_and_scales_tokens():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 77, 16, generator=g) + 0.5  # mean well away from 0
    weights = 1 + 0.5 * torch.rand(2, 77, generator=g)
    out = apply_weights(z, weights)
    # float32 means of 1232 values: agreement to ~1e-6 relative.
    torch.testing.assert_close(out.mean(dim=(1, 2)), z.mean(dim=(1, 2)), rtol=1e-5, atol=1e-6)
    ratio = out / (z * weights[:, :, None])  # one rescale constant per batch item
    torch.testing.assert_close(ratio, ratio[:, :1, :1].expand_as(ratio), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, z)
    torch.testing.assert_close(apply_weights(z, torch.ones(2, 77)), z)
    assert apply_weights(z.half(), weights).dtype == torch.float16
    with pytest.raises(ValueError, match="weights"):
        apply_weights(z, weights[:, :76])

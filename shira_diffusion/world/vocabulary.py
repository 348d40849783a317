"""The world's tokenizer: a real CLIPTokenizer whose vocabulary makes every world word one token.

CLIP's byte-level BPE needs a vocabulary (the 256 byte characters, alone and word-final, then merged
pieces) and ranked merges. `build_tokenizer` writes both so each word in `WORDS` merges left to right
into a single token (checked: `check_tokenizer` raises naming the first word that does not); any other
word still tokenizes, character by character. The files ship in the world model's `tokenizer/` folder;
this module is how they were made.

Usage:
    build_tokenizer("model/tokenizer")        # vocab.json, merges.txt, tokenizer_config.json
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from .scenes import BACKGROUNDS, COLOURS, SHAPES
from .styles import STYLES

MAX_LENGTH = 32  # tokens, with start and end: the longest fused prompt uses 18
_PROMPT_WORDS = (
    "a", "an", "the", "on", "in", "of", "with", "and", "background", "style", "small", "large", "big",
    "left", "right", "top", "bottom", "center", "shape", "object", "picture", "image", "photo", "drawing",
    "painted", "burning", "flames", "flame", "brush", "strokes", "canvas", "oil", "art",
)
WORDS = tuple(dict.fromkeys(
    list(SHAPES) + list(COLOURS) + list(BACKGROUNDS) + [w for phrase, _ in STYLES.values() for w in phrase.split()] + list(_PROMPT_WORDS)
))
SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def _merges() -> list[tuple[str, str]]:
    """BPE merges learnt from the world's words (tokenizers' trainer): encoding replays them in the order
    they were learnt, so every word they were learnt from comes out whole."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=100_000, min_frequency=1, show_progress=False, end_of_word_suffix="</w>")
    tokenizer.train_from_iterator([" ".join(WORDS)], trainer=trainer)
    return [tuple(pair.split(" ")) if isinstance(pair, str) else tuple(pair) for pair in json.loads(tokenizer.to_str())["model"]["merges"]]


def build_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """Write the world tokenizer to `folder` and return it loaded from there (checked)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    characters = list(bytes_to_unicode().values())
    vocab = characters + [c + "</w>" for c in characters]
    merges = _merges()
    vocab += [left + right for left, right in merges if left + right not in vocab]
    vocab += list(SPECIAL)
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(vocab)}, ensure_ascii=False, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "bos_token": SPECIAL[0],
        "eos_token": SPECIAL[1], "pad_token": SPECIAL[1], "unk_token": SPECIAL[1],
    }, indent=2))
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    check_tokenizer(tokenizer)
    return tokenizer


def check_tokenizer(tokenizer: CLIPTokenizer) -> None:
    """Raise ValueError naming the first world word that is not a single token."""
    for word in WORDS:
        tokens = tokenizer.tokenize(word)
        if tokens != [word + "</w>"]:
            raise ValueError(f"world word {word!r} tokenizes to {tokens}, expected one token {word + '</w>'!r}")

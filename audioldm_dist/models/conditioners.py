"""Frozen text/audio encoders that condition the UNet, through transformers.

- `ClapConditioner`: the original AudioLDM's CLAP (laion_clap HTSAT + RoBERTa) as transformers'
  `ClapModel` (see `models/clap.py`): a 512-d, L2-normalised text or audio embedding that enters the UNet
  through FiLM. Its weights come from a hub name / save_pretrained folder, a laion_clap .pt (converted),
  or the LDM checkpoint itself.
- `T5Conditioner`: a FLAN-T5 encoder whose token states (and padding mask) feed cross-attention.
Both are frozen (no grad, never given to the optimizer). Building one needs neither weights nor a
tokenizer (the tokenizer loads on the first encode), so `build_conditioner(..., load_weights=False)` +
`load_weights()` lets callers fill it from a checkpoint first and read `pretrained` only if needed.
`random_init` builds them from small `tiny` config values with a word-level tokenizer fitted on given
captions, so tests and the demo run offline.

Classifier-free guidance, as the original: the unconditional embedding is the encoder's output for the
empty caption (CLAP: its TEXT embedding, also in audio mode); `batch_dropped` decides whole batches
(`ucg_rate`), `drop_samples` single samples (CLAP's `ucg_sample_rate`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from audioldm_dist.config import ConditionerConfig
from audioldm_dist.models.clap import ClapAudioFrontEnd, convert_laion_state_dict, is_laion_layout, laion_clap_config
from audioldm_dist.models.hub import from_pretrained

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


@dataclass
class Condition:
    """What the UNet consumes: a FiLM vector and/or cross-attention contexts with masks."""

    film: torch.Tensor | None = None  # (B, film_dim)
    contexts: list[torch.Tensor] | None = None  # [(B, N, dim)]
    masks: list[torch.Tensor] | None = None  # [(B, N) bool]

    def select(self, keep: torch.Tensor, other: "Condition") -> "Condition":
        """Per sample: self where `keep`, else `other` (for guidance dropout)."""
        def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.where(keep.reshape(-1, *([1] * (a.dim() - 1))), a, b.expand_as(a))

        return Condition(
            film=None if self.film is None else pick(self.film, other.film),
            contexts=None if self.contexts is None else [pick(a, b) for a, b in zip(self.contexts, other.contexts)],
            masks=None if self.masks is None else [pick(a, b) for a, b in zip(self.masks, other.masks)],
        )

    @classmethod
    def from_stored(cls, embedding: torch.Tensor, mask: torch.Tensor | None, *, device: torch.device) -> "Condition":
        """What `stored()` gave back (encoded shards): (B, D) → FiLM; (B, N, D) with its (B, N) mask → a context."""
        if embedding.dim() == 2:
            return cls(film=embedding.to(device))
        assert mask is not None, "a stored cross-attention context needs its mask"
        return cls(contexts=[embedding.to(device)], masks=[mask.to(device=device, dtype=torch.bool)])

    def stored(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(embedding, mask) to store: the FiLM vector (B, D), or the one context (B, N, D) with its mask."""
        if self.film is not None:
            return self.film, None
        assert self.contexts is not None and len(self.contexts) == 1, "one cross-attention context expected"
        return self.contexts[0], self.masks[0]

    def repeat(self, batch: int) -> "Condition":
        def expand(t: torch.Tensor) -> torch.Tensor:
            return t.expand(batch, *t.shape[1:])

        return Condition(film=None if self.film is None else expand(self.film),
                         contexts=None if self.contexts is None else [expand(c) for c in self.contexts],
                         masks=None if self.masks is None else [expand(m) for m in self.masks])


def build_word_tokenizer(captions: list[str], *, max_length: int):
    """A small word-level tokenizer over `captions` (offline stand-in for RoBERTa / T5 tokenizers)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    # Lower-cased when the vocabulary is fitted and when text is encoded alike: "A4" and "Hz" are words, not <unk>.
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(captions, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    # Every text, the empty caption included, becomes at least "<s> </s>", as RoBERTa's tokenizer does.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[(token, tokenizer.token_to_id(token)) for token in ("<s>", "</s>")])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", model_max_length=max_length)


def is_transformers_source(pretrained: str) -> bool:
    """True for a hub name or save_pretrained folder; False for "" and for a .pt/.ckpt file."""
    return bool(pretrained) and not Path(pretrained).is_file() and not pretrained.endswith((".pt", ".ckpt"))


class _FrozenEncoder(nn.Module):
    default_tokenizer = ""
    """Tokenizer when neither `tokenizer` nor a transformers `pretrained` names one."""

    def __init__(self, config: ConditionerConfig, *, captions: list[str] | None) -> None:
        super().__init__()
        self.config = config
        self._unconditional: Condition | None = None
        self._tokenizer = build_word_tokenizer(captions or [""], max_length=config.max_length) \
            if config.random_init else None
        self.register_load_state_dict_post_hook(lambda module, incompatible: module.forget_unconditional())

    def _random_init_overrides(self) -> dict:
        """Seeds the random weights; returns the remaining `tiny` overrides."""
        tiny = dict(self.config.tiny)
        torch.manual_seed(tiny.pop("seed", 0))
        return tiny

    @property
    def tokenizer(self):
        """Loaded on first use, so that building the model needs no tokenizer files."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            name, setting = self.tokenizer_source()
            self._tokenizer = from_pretrained(AutoTokenizer, name, setting=setting)
        return self._tokenizer

    def tokenizer_source(self) -> tuple[str, str]:
        """(name, the config key that chose it)."""
        if self.config.tokenizer:
            return self.config.tokenizer, "conditioner.tokenizer"
        if is_transformers_source(self.config.pretrained):
            return self.config.pretrained, "conditioner.pretrained"
        return self.default_tokenizer, "conditioner.tokenizer"

    def load_weights(self) -> None:
        """Loads `pretrained` (call it only when no checkpoint supplied the conditioner's weights)."""
        if self.config.random_init:
            return
        if not self.config.pretrained:
            raise ValueError("conditioner.pretrained is empty and no checkpoint supplied the conditioner's weights: "
                             "pass an AudioLDM checkpoint that contains cond_stage_model.* (--reload_from_ckpt / "
                             "--ckpt), or set conditioner.pretrained to a laion_clap .pt, a save_pretrained folder "
                             "or a hub name")
        self._load_pretrained(self.config.pretrained)
        self.forget_unconditional()
        self.freeze()

    def _load_pretrained(self, pretrained: str) -> None:
        raise NotImplementedError

    def freeze(self) -> None:
        self.eval()
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> "_FrozenEncoder":
        return super().train(False)  # frozen: dropout stays off whatever the trainer asks

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _tokenize(self, texts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer([text.lower() if self.config.random_init else text for text in texts],
                                padding="max_length", truncation=True,  # equal lengths: guidance swaps rows
                                max_length=self.config.max_length, return_tensors="pt")
        return {key: value.to(device) for key, value in tokens.items() if key in ("input_ids", "attention_mask")}

    def forget_unconditional(self) -> None:
        self._unconditional = None

    def unconditional(self, device: torch.device) -> Condition:
        """The encoding of the empty caption (B=1), cached per device."""
        if self._unconditional is None or _device_of(self._unconditional) != device:
            self._unconditional = self.encode_text([""], device=device)
        return self._unconditional

    @property
    def sample_dropout_rate(self) -> float:
        return 0.0

    def batch_dropped(self, *, generator: torch.Generator | None = None) -> bool:
        """One uniform draw < ucg_rate: the whole batch becomes unconditional (ddpm.py:1136-1140, 1211-1215)."""
        return float(torch.rand(1, generator=generator, device=_generator_device(generator))) < self.config.ucg_rate

    def drop_samples(self, condition: Condition, *, generator: torch.Generator | None = None) -> Condition:
        """Each sample becomes unconditional with probability `sample_dropout_rate` (CLAP: CM:1321-1324)."""
        rate = self.sample_dropout_rate
        if rate <= 0:
            return condition
        reference = condition.film if condition.film is not None else condition.contexts[0]
        drop = torch.rand(reference.shape[0], generator=generator, device=_generator_device(generator)) < rate
        return condition.select(~drop.to(reference.device), self.unconditional(reference.device))

    def encode_text(self, texts: list[str], *, device: torch.device) -> Condition:
        raise NotImplementedError


def _device_of(condition: Condition) -> torch.device:
    tensor = condition.film if condition.film is not None else condition.contexts[0]
    return tensor.device


def _generator_device(generator: torch.Generator | None) -> torch.device | None:
    return None if generator is None else generator.device


class ClapConditioner(_FrozenEncoder):
    """CLAP text or audio embedding (B, 512), L2-normalised → FiLM."""

    default_tokenizer = "roberta-base"  # original: CM RobertaTokenizer.from_pretrained("roberta-base")

    def __init__(self, config: ConditionerConfig, *, captions: list[str] | None = None) -> None:
        super().__init__(config, captions=captions)
        from transformers import ClapModel

        self.model = ClapModel(self._random_init_config() if config.random_init else self._architecture())
        self.front_end = ClapAudioFrontEnd()
        self.embedding_dim = self.model.config.projection_dim
        self.freeze()

    def _architecture(self):
        """The ClapConfig, without weights: from a transformers `pretrained`, else the original's `amodel`."""
        from transformers import ClapConfig

        if is_transformers_source(self.config.pretrained):
            return from_pretrained(ClapConfig, self.config.pretrained, setting="conditioner.pretrained")
        return laion_clap_config(amodel=self.config.amodel)

    def _random_init_config(self):
        from transformers import ClapConfig

        tiny = self._random_init_overrides()
        text = dict(vocab_size=len(self.tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=self.config.max_length + 4,
                    pad_token_id=self.tokenizer.pad_token_id, **tiny.pop("text", {}))
        # spec_size 256 with 64 mels: the original front end's input size, on a tiny Swin.
        audio = dict(hidden_size=32, patch_embeds_hidden_size=16, depths=[1, 1], num_attention_heads=[1, 2],
                     window_size=8, spec_size=256, num_mel_bins=64, enable_fusion=False, **tiny.pop("audio", {}))
        projection_dim = tiny.pop("projection_dim", 512)
        return ClapConfig(text_config=text | {"projection_dim": projection_dim},
                          audio_config=audio | {"projection_dim": projection_dim}, projection_dim=projection_dim, **tiny)

    def _load_pretrained(self, pretrained: str) -> None:
        if is_transformers_source(pretrained):
            from transformers import ClapModel

            loaded = from_pretrained(ClapModel, pretrained, setting="conditioner.pretrained")
            self.model.load_state_dict(loaded.state_dict())
            return
        self.load_laion_state_dict(read_laion_file(pretrained), source=f"conditioner.pretrained={pretrained}")

    def load_laion_state_dict(self, state: dict[str, torch.Tensor], *, source: str) -> list[str]:
        """Converts laion_clap names and loads strictly; returns the dropped (unused) original keys."""
        converted, dropped = convert_laion_state_dict(state)
        try:
            self.model.load_state_dict(converted, strict=True)
        except RuntimeError as error:
            raise ValueError(f"{source}: not a laion_clap CLAP with conditioner.amodel={self.config.amodel} "
                             f"({str(error).splitlines()[1] if len(str(error).splitlines()) > 1 else error})") from None
        return dropped

    @property
    def sample_dropout_rate(self) -> float:
        return self.config.ucg_sample_rate

    @torch.no_grad()
    def encode_text(self, texts: list[str], *, device: torch.device) -> Condition:
        """RoBERTa pooler → text_projection → L2 norm (original: CM:1328-1336, padding to max_length)."""
        output = self.model.get_text_features(**self._tokenize(texts, device))
        return Condition(film=_normalized(output))

    @torch.no_grad()
    def encode_audio(self, waveform: torch.Tensor, *, sample_rate: int) -> Condition:
        """(B, 1, T) waveform at `sample_rate` → CLAP audio embedding on the waveform's device."""
        device = self.device
        features = self.front_end(waveform.to(device), sample_rate=sample_rate)  # (B, 1, frames, 64)
        output = self.model.get_audio_features(input_features=features.to(next(self.model.parameters()).dtype))
        return Condition(film=_normalized(output).to(waveform.device))


def _normalized(output) -> torch.Tensor:
    # transformers ≥ 5 returns a model output whose pooler_output is the projected embedding.
    embedding = output if isinstance(output, torch.Tensor) else output.pooler_output
    return nn.functional.normalize(embedding, dim=-1)


def read_laion_file(path: str) -> dict[str, torch.Tensor]:
    """A laion_clap checkpoint (.pt: `state_dict` with `module.` names, or a raw state dict)."""
    if not Path(path).is_file():
        raise ValueError(f"conditioner.pretrained={path!r}: no such file (expected a laion_clap .pt such as "
                         f"clap_htsat_tiny.pt)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"conditioner.pretrained={path!r}: not a readable torch checkpoint "
                         f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
    if not isinstance(state, dict) or not is_laion_layout(state):
        raise ValueError(f"conditioner.pretrained={path!r}: expected a laion_clap state dict "
                         f"(text_branch.* / audio_branch.* keys)")
    return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}


class T5Conditioner(_FrozenEncoder):
    """FLAN-T5 encoder token states → cross-attention context (with its padding mask)."""

    def __init__(self, config: ConditionerConfig, *, captions: list[str] | None = None) -> None:
        super().__init__(config, captions=captions)
        from transformers import T5Config, T5EncoderModel

        if config.random_init:
            tiny = self._random_init_overrides()
            architecture = T5Config(**(dict(vocab_size=len(self.tokenizer), d_model=64, d_kv=16, d_ff=128,
                                            num_layers=1, num_heads=4) | tiny))
        elif is_transformers_source(config.pretrained):
            architecture = from_pretrained(T5Config, config.pretrained, setting="conditioner.pretrained")
        else:
            raise ValueError(f"conditioner.pretrained={config.pretrained!r}: kind=t5 needs a hub name or "
                             f"save_pretrained folder (its architecture and tokenizer)")
        self.model = T5EncoderModel(architecture)
        self.embedding_dim = self.model.config.d_model
        self.freeze()

    def _load_pretrained(self, pretrained: str) -> None:
        from transformers import T5EncoderModel

        loaded = from_pretrained(T5EncoderModel, pretrained, setting="conditioner.pretrained")
        self.model.load_state_dict(loaded.state_dict())

    @torch.no_grad()
    def encode_text(self, texts: list[str], *, device: torch.device) -> Condition:
        tokens = self._tokenize(texts, device)
        states = self.model(**tokens).last_hidden_state
        return Condition(contexts=[states], masks=[tokens["attention_mask"].bool()])


def build_conditioner(config: ConditionerConfig, *, captions: list[str] | None = None,
                      load_weights: bool = True) -> _FrozenEncoder:
    """The configured encoder; `captions` fit the word tokenizer of a random_init model.

    `load_weights=False` builds the architecture only (no weights, no tokenizer, no network for .pt or
    empty `pretrained`); call `load_weights()` afterwards if no checkpoint supplied them."""
    kinds = {"clap": ClapConditioner, "t5": T5Conditioner}
    conditioner = kinds[config.kind](config, captions=captions)
    if load_weights:
        conditioner.load_weights()
    return conditioner

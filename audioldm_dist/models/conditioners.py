"""Frozen text/audio encoders that condition the UNet, through transformers.

- `ClapConditioner`: transformers' `ClapModel` (the architecture and released weights of LAION CLAP):
  a 512-d, L2-normalised text or audio embedding that enters the UNet through FiLM.
- `T5Conditioner`: a FLAN-T5 encoder whose token states (and padding mask) feed cross-attention.
Both are frozen (no grad, never given to the optimizer). `random_init` builds them from the small
`tiny` config values with random weights and a word-level tokenizer fitted on given captions, so
tests and the demo run offline; real runs load `pretrained` with `from_pretrained`.

Classifier-free guidance: the unconditional embedding is the encoder's output for the empty caption,
as in AudioLDM; `drop_for_guidance` replaces whole batches with it at `ucg_rate`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from audioldm_dist.config import ConditionerConfig

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

    def repeat(self, batch: int) -> "Condition":
        def expand(t: torch.Tensor) -> torch.Tensor:
            return t.expand(batch, *t.shape[1:])

        return Condition(film=None if self.film is None else expand(self.film),
                         contexts=None if self.contexts is None else [expand(c) for c in self.contexts],
                         masks=None if self.masks is None else [expand(m) for m in self.masks])


def build_word_tokenizer(captions: list[str], *, max_length: int):
    """A small word-level tokenizer over `captions` (offline stand-in for RoBERTa / T5 tokenizers)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([caption.lower() for caption in captions],
                                  trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    # Every text, the empty caption included, becomes at least "<s> </s>", as RoBERTa's tokenizer does.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[(token, tokenizer.token_to_id(token)) for token in ("<s>", "</s>")])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", model_max_length=max_length)


class _FrozenEncoder(nn.Module):
    def __init__(self, config: ConditionerConfig) -> None:
        super().__init__()
        self.config = config
        self._unconditional: Condition | None = None

    def _start_random_init(self, captions: list[str] | None) -> dict:
        """Fits the word tokenizer, seeds the random weights; returns the remaining `tiny` overrides."""
        tiny = dict(self.config.tiny)
        self.tokenizer = build_word_tokenizer(captions or [""], max_length=self.config.max_length)
        torch.manual_seed(tiny.pop("seed", 0))
        return tiny

    def freeze(self) -> None:
        self.eval()
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> "_FrozenEncoder":
        return super().train(False)  # frozen: dropout stays off whatever the trainer asks

    def _tokenize(self, texts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer([text.lower() if self.config.random_init else text for text in texts],
                                padding="max_length", truncation=True,  # equal lengths: guidance swaps rows
                                max_length=self.config.max_length, return_tensors="pt")
        return {key: value.to(device) for key, value in tokens.items() if key in ("input_ids", "attention_mask")}

    def unconditional(self, device: torch.device) -> Condition:
        if self._unconditional is None or _device_of(self._unconditional) != device:
            self._unconditional = self.encode_text([""], device=device)
        return self._unconditional

    def drop_for_guidance(self, condition: Condition, *, batch_size: int, device: torch.device,
                          generator: torch.Generator | None = None) -> Condition:
        """With probability `ucg_rate`, the whole batch becomes unconditional (AudioLDM's rule)."""
        if self.config.ucg_rate <= 0:
            return condition
        drop = torch.rand((), generator=generator).item() < self.config.ucg_rate
        keep = torch.full((batch_size,), not drop, dtype=torch.bool, device=device)
        return condition.select(keep, self.unconditional(device).repeat(batch_size))

    def encode_text(self, texts: list[str], *, device: torch.device) -> Condition:
        raise NotImplementedError


def _device_of(condition: Condition) -> torch.device:
    tensor = condition.film if condition.film is not None else condition.contexts[0]
    return tensor.device


class ClapConditioner(_FrozenEncoder):
    """CLAP text (or audio) embedding → FiLM."""

    def __init__(self, config: ConditionerConfig, *, captions: list[str] | None = None) -> None:
        super().__init__(config)
        from transformers import ClapConfig, ClapModel

        if config.random_init:
            tiny = self._start_random_init(captions)
            text = dict(vocab_size=len(self.tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=config.max_length + 4,
                        pad_token_id=self.tokenizer.pad_token_id, **tiny.pop("text", {}))
            audio = dict(hidden_size=32, patch_embeds_hidden_size=16, depths=[1, 1], num_attention_heads=[1, 2],
                         window_size=4, spec_size=64, num_mel_bins=64, enable_fusion=False, **tiny.pop("audio", {}))
            projection_dim = tiny.pop("projection_dim", 512)
            self.model = ClapModel(ClapConfig(text_config=text | {"projection_dim": projection_dim},
                                              audio_config=audio | {"projection_dim": projection_dim},
                                              projection_dim=projection_dim, **tiny))
        else:
            from transformers import AutoTokenizer

            self.model = ClapModel.from_pretrained(config.pretrained)
            self.tokenizer = AutoTokenizer.from_pretrained(config.pretrained)
        self.embedding_dim = self.model.config.projection_dim
        self.freeze()

    @staticmethod
    def _pooled(output) -> torch.Tensor:
        # transformers ≥ 5 returns a model output whose pooler_output is the projected embedding.
        embedding = output if isinstance(output, torch.Tensor) else output.pooler_output
        return nn.functional.normalize(embedding, dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: list[str], *, device: torch.device) -> Condition:
        return Condition(film=self._pooled(self.model.get_text_features(**self._tokenize(texts, device))))

    @torch.no_grad()
    def encode_audio(self, waveform: torch.Tensor, *, sample_rate: int) -> Condition:
        """(B, 1, T) waveform → CLAP audio embedding (AudioLDM's `embed_mode: audio`)."""
        import torchaudio
        from transformers import ClapFeatureExtractor

        audio_config = self.model.config.audio_config
        frames = audio_config.spec_size * (audio_config.spec_size // audio_config.num_mel_bins)
        extractor = ClapFeatureExtractor(feature_size=audio_config.num_mel_bins, sampling_rate=48000, hop_length=480,
                                         nb_max_samples=frames * 480, truncation="rand_trunc", padding="repeatpad")
        audio_48k = torchaudio.functional.resample(waveform.float().cpu()[:, 0], sample_rate, 48000)
        features = extractor(list(np.asarray(audio_48k)), sampling_rate=48000, return_tensors="pt")
        embedding = self.model.get_audio_features(input_features=features["input_features"][:, :, :frames].to(waveform.device))
        return Condition(film=self._pooled(embedding))


class T5Conditioner(_FrozenEncoder):
    """FLAN-T5 encoder token states → cross-attention context (with its padding mask)."""

    def __init__(self, config: ConditionerConfig, *, captions: list[str] | None = None) -> None:
        super().__init__(config)
        from transformers import T5Config, T5EncoderModel

        if config.random_init:
            tiny = self._start_random_init(captions)
            self.model = T5EncoderModel(T5Config(**(dict(vocab_size=len(self.tokenizer), d_model=64, d_kv=16, d_ff=128,
                                                         num_layers=1, num_heads=4) | tiny)))
        else:
            from transformers import AutoTokenizer

            self.model = T5EncoderModel.from_pretrained(config.pretrained)
            self.tokenizer = AutoTokenizer.from_pretrained(config.pretrained)
        self.embedding_dim = self.model.config.d_model
        self.freeze()

    @torch.no_grad()
    def encode_text(self, texts: list[str], *, device: torch.device) -> Condition:
        tokens = self._tokenize(texts, device)
        states = self.model(**tokens).last_hidden_state
        return Condition(contexts=[states], masks=[tokens["attention_mask"].bool()])


class LaionClapConditioner(_FrozenEncoder):
    """A laion_clap checkpoint (`pretrained` = its .pt path) through the `laion_clap` package (extra).

    Not the default: laion_clap pins numpy<2 and downloads roberta-base when it is built, so it cannot
    be installed or tested on machines without network; kind=clap loads the same weights through
    transformers.
    """

    def __init__(self, config: ConditionerConfig, *, captions: list[str] | None = None) -> None:
        super().__init__(config)
        try:
            import laion_clap
        except ImportError:
            raise ValueError("conditioner.kind=laion needs the optional extra: pip install audioldm-dist[laion]; "
                             "or use kind=clap (transformers' ClapModel, the same weights)") from None
        self.model = laion_clap.CLAP_Module(enable_fusion=False, amodel=config.tiny.get("amodel", "HTSAT-base"))
        self.model.load_ckpt(config.pretrained)
        self.embedding_dim = 512
        self.freeze()

    @torch.no_grad()
    def encode_text(self, texts: list[str], *, device: torch.device) -> Condition:
        embedding = self.model.get_text_embedding(texts, use_tensor=True).to(device)
        return Condition(film=nn.functional.normalize(embedding, dim=-1))


def build_conditioner(config: ConditionerConfig, *, captions: list[str] | None = None) -> _FrozenEncoder:
    """The configured encoder; `captions` fit the word tokenizer of a random_init model."""
    kinds = {"clap": ClapConditioner, "t5": T5Conditioner, "laion": LaionClapConditioner}
    return kinds[config.kind](config, captions=captions)

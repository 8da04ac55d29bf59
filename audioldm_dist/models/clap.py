"""The original AudioLDM's CLAP (laion_clap HTSAT + RoBERTa) as transformers' `ClapModel`.

Three pieces, so that the released weights give the released embeddings without laion_clap:
- `laion_clap_config(amodel=...)`: the `ClapConfig` of laion_clap's HTSAT-tiny / HTSAT-base audio tower
  and roberta-base text tower, built offline (no hub), with exactly the released tensor shapes.
- `convert_laion_state_dict(state)`: laion_clap keys (a released AudioLDM checkpoint's
  `cond_stage_model.model.*`, the training repo's `cond_stage_models.0.model.*`, or a standalone CLAP
  .pt whose keys may carry `module.`) → `ClapModel` keys, by the renaming rules of transformers'
  `convert_clap_original_pytorch_to_hf.py` (qkv split in three, `sequential.N` → `layers.N//3.linear`,
  `_projection.0/2` → `linear1/2`). `DROPPED_KEY_PATTERNS` lists what has no counterpart (20 keys of a
  released file): the torchlibrosa front end, Swin attention masks, the AudioSet head and the
  `*_transform` MLPs of contrastive training; none of them feeds an embedding except the front end,
  which `ClapAudioFrontEnd` recomputes.
- `ClapAudioFrontEnd`: the original's audio path in torch (GPU tensors, no numpy round trip): resample
  to 48 kHz as conditional_models.py does, the original length rule, and laion HTSAT's torchlibrosa
  log-mel, so that `ClapModel.get_audio_features(input_features=front_end(wave))` is laion's embedding.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

ROBERTA_BASE = dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, hidden_act="gelu", max_position_embeddings=514, type_vocab_size=1,
                    layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)
"""roberta-base's config values (a bare RobertaConfig would give 512 positions and 2 token types)."""

HTSAT = {"HTSAT-tiny": dict(patch_embeds_hidden_size=96, depths=[2, 2, 6, 2], hidden_size=768),
         "HTSAT-base": dict(patch_embeds_hidden_size=128, depths=[2, 2, 12, 2], hidden_size=1024)}
"""laion_clap htsat.py create_htsat_model: embed_dim, depths; num_features = embed_dim * 8."""

CLAP_SAMPLE_RATE = 48000
CLAP_NUM_SAMPLES = 480000
"""The original keeps the first 480,000 samples at 48 kHz (clap/training/data.py get_audio_features)."""

RENAMES = {"text_branch": "text_model", "audio_branch": "audio_model.audio_encoder", "attn": "attention.self",
           "self.proj": "output.dense", "attention.self_mask": "attn_mask", "mlp.fc1": "intermediate.dense",
           "mlp.fc2": "output.dense", "norm1": "layernorm_before", "norm2": "layernorm_after",
           "bn0": "batch_norm"}
"""KEYS_TO_MODIFY_MAPPING of transformers' convert_clap_original_pytorch_to_hf.py, applied in this order."""

DROPPED_KEY_PATTERNS = (r"^audio_branch\.spectrogram_extractor\.", r"^audio_branch\.logmel_extractor\.",
                        r"^audio_branch\.layers\.\d+\.blocks\.\d+\.attn_mask$", r"^audio_branch\.tscam_conv\.",
                        r"^audio_branch\.head\.", r"^text_transform\.", r"^audio_transform\.", r"^mel_transform\.")
"""laion keys with no ClapModel counterpart (+ the training repo's unused torchaudio `mel_transform`)."""

LAION_PREFIXES = ("cond_stage_model.model.", "cond_stage_models.0.model.", "cond_stage_models.0.", "module.")


def laion_clap_config(*, amodel: str = "HTSAT-tiny"):
    """The `ClapConfig` of the original CLAP (`amodel` HTSAT-tiny or HTSAT-base, roberta-base text)."""
    from transformers import ClapConfig

    if amodel not in HTSAT:
        raise ValueError(f"conditioner.amodel={amodel!r}: expected one of {', '.join(HTSAT)}")
    audio = dict(num_attention_heads=[4, 8, 16, 32], window_size=8, spec_size=256, num_mel_bins=64,
                 enable_fusion=False, layer_norm_eps=1e-5, projection_dim=512, projection_hidden_act="relu",
                 **HTSAT[amodel])
    text = dict(ROBERTA_BASE, projection_dim=512, projection_hidden_act="relu")
    return ClapConfig(text_config=text, audio_config=audio, projection_dim=512)


def is_laion_layout(keys) -> bool:
    """True if any key is a laion_clap name (its `text_branch` / `audio_branch` towers)."""
    return any(".text_branch." in f".{key}" or ".audio_branch." in f".{key}" for key in keys)


def strip_laion_prefix(key: str) -> str:
    for prefix in LAION_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def rename_laion_key(key: str) -> str:
    """One laion key (prefix stripped) → its ClapModel name (before the qkv split)."""
    for old, new in RENAMES.items():
        key = key.replace(old, new)
    sequential = re.match(r".*sequential\.(\d+)\.", key)
    projection = re.match(r".*_projection\.(\d+)\.", key)
    if sequential:
        number = int(sequential.group(1))
        key = key.replace(f"sequential.{number}.", f"layers.{number // 3}.linear.")
    elif projection:
        number = int(projection.group(1))
        key = key.replace(f"_projection.{number}.", f"_projection.linear{1 if number == 0 else 2}.")
    return key


def convert_laion_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """laion_clap state dict → (ClapModel state dict, the dropped original keys).

    Constant buffers that ClapModel has and laion files may lack (`token_type_ids`, and `position_ids`,
    persistent only in transformers ≤ 4.30) are filled with their fixed values."""
    converted: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for original, tensor in state.items():
        key = strip_laion_prefix(original)
        if any(re.search(pattern, key) for pattern in DROPPED_KEY_PATTERNS):
            dropped.append(original)
            continue
        key = rename_laion_key(key)
        if "qkv" in key:  # fused attention projection → query, key, value
            for name, part in zip(("query", "key", "value"), tensor.chunk(3, dim=0)):
                converted[key.replace("qkv", name)] = part.clone()
        else:
            converted[key] = tensor
    positions = converted.setdefault("text_model.embeddings.position_ids",
                                     torch.arange(ROBERTA_BASE["max_position_embeddings"])[None])
    converted.setdefault("text_model.embeddings.token_type_ids", torch.zeros_like(positions))
    return converted, dropped


def fit_clap_length(audio: torch.Tensor, *, num_samples: int = CLAP_NUM_SAMPLES) -> torch.Tensor:
    """(B, T) at 48 kHz → (B, num_samples).

    Longer: the first `num_samples` (original: clap/training/data.py:438-467, `audio_data[..., :max_len]`,
    `longer=True`; a 10.24 s clip is 491,520 samples). Shorter, where the original asserts: laion_clap's
    `repeatpad` (repeat whole copies, then zero-pad), the filling the original names (CM:1297-1304)."""
    length = audio.shape[-1]
    if length >= num_samples:
        return audio[..., :num_samples]
    repeated = audio.repeat(1, num_samples // length) if length > 0 else audio
    return nn.functional.pad(repeated, (0, num_samples - repeated.shape[-1]))


class ClapAudioFrontEnd(nn.Module):
    """(B, 1, T) or (B, T) waveform at `sample_rate` → HTSAT's log-mel input (B, 1, 1001, 64), on its device.

    laion htsat.py: torchlibrosa `Spectrogram(n_fft=1024, hop=480, win=1024, hann, center, reflect,
    power=2)` and `LogmelFilterBank(sr=48000, n_fft=1024, n_mels=64, fmin=50, fmax=14000, ref=1,
    amin=1e-10, top_db=None)`: 10·log10(max(mel, 1e-10)), librosa's Slaney mel filters."""

    def __init__(self, *, n_fft: int = 1024, hop_length: int = 480, num_mel_bins: int = 64,
                 f_min: float = 50.0, f_max: float = 14000.0) -> None:
        super().__init__()
        from torchaudio.functional import melscale_fbanks

        self.n_fft = n_fft
        self.hop_length = hop_length
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)  # librosa 'hann' = periodic
        self.register_buffer("mel_filters", melscale_fbanks(n_fft // 2 + 1, f_min, f_max, num_mel_bins,
                                                            CLAP_SAMPLE_RATE, norm="slaney", mel_scale="slaney"),
                             persistent=False)  # (n_fft/2+1, mels)

    def forward(self, waveform: torch.Tensor, *, sample_rate: int) -> torch.Tensor:
        import torchaudio

        audio = waveform.reshape(waveform.shape[0], -1).float()  # (B, T)
        if sample_rate != CLAP_SAMPLE_RATE:  # original: CM:1291-1294, torchaudio's defaults
            audio = torchaudio.functional.resample(audio, orig_freq=sample_rate, new_freq=CLAP_SAMPLE_RATE)
        audio = fit_clap_length(audio)
        spectrum = torch.stft(audio, self.n_fft, hop_length=self.hop_length, win_length=self.n_fft,
                              window=self.window, center=True, pad_mode="reflect", return_complex=True)
        power = torch.view_as_real(spectrum).pow(2).sum(-1)  # (B, freqs, frames): real² + imag²
        mel = power.transpose(1, 2) @ self.mel_filters  # (B, frames, mels)
        return (10.0 * torch.log10(mel.clamp_min(1e-10))).unsqueeze(1)  # (B, 1, frames, mels)

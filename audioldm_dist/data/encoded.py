"""Encoded samples (what `encode-shards` writes): the schema, and the loader's sample from one.

An encoded sample is one crop of a clip with everything the frozen models computed for it, so training
reads no audio and runs no STFT, VAE encoder or conditioner forward:

    KEY.mean.npy        VAE posterior mean (C, frames/f, mels/f), float16 (or float32) .npy
    KEY.logvar.npy      its log-variance, clamped to [-30, 20] as `DiagonalGaussian` does
    KEY.text.npy        the conditioner's text encoding of EVERY caption: CLAP (captions, D);
                        T5 (captions, tokens, D) with KEY.text_mask.npy (captions, tokens) bool
    KEY.clap_audio.npy  CLAP only: the audio embedding of the crop (D,)
    KEY.json            the source sample's metadata (same keys as a make-shards sample) and
                        `crop_index`, `crop_start` (samples at the source's rate), `source` (shard#index),
                        `encoding` (the fingerprints below)

`encoding` = {"vae", "conditioner", "audio", "fingerprint"}: sha256 prefixes of the VAE and conditioner
weights, of the audio config, and of the three together (`audioldm_dist/encoding.py`). The trainer refuses
shards whose fingerprint differs from its model's (`check_encoding`), and the loader checks every sample.

The loader's sample draws the caption with the same per-sample rng as an audio sample
(`batch.choose_caption`), so with the same crop, caption choice is the same as on the fly; the latent is
sampled from the posterior later, in `AudioLDM.loss`, with the trainer's generator, as on the fly.
"""
from __future__ import annotations

import functools
import io
import json

import numpy as np
import torch

from audioldm_dist.config import AudioConfig
from audioldm_dist.data import schema
from audioldm_dist.data.audio import AudioDecodeError
from audioldm_dist.data.batch import choose_caption, label_vector
from audioldm_dist.data.metadata import LabelIndex

MEAN = "mean.npy"
LOGVAR = "logvar.npy"
TEXT = "text.npy"
TEXT_MASK = "text_mask.npy"
CLAP_AUDIO = "clap_audio.npy"
ENCODING = "encoding"  # json field
CROP_INDEX = "crop_index"
CROP_START = "crop_start"
SOURCE = "source"
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}


class EncodingMismatchError(RuntimeError):
    """Encoded shards made with other weights or another audio config than the model that would train on them.
    A RuntimeError (not a ValueError), so the loader's per-sample fault handling never swallows it."""


def is_encoded(members: dict[str, bytes]) -> bool:
    return MEAN in members


def array_bytes(array: np.ndarray | torch.Tensor, *, dtype: str) -> bytes:
    """A tensor as .npy bytes in the storage dtype (bool stays bool); deterministic bytes."""
    value = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if value.dtype != np.bool_:
        value = value.astype(STORAGE_DTYPES[dtype])
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(value), allow_pickle=False)
    return buffer.getvalue()


def read_array(data: bytes, *, name: str) -> torch.Tensor:
    """.npy bytes → a float32 (or bool) tensor; AudioDecodeError("corrupt") for unreadable or non-finite data.
    The header is parsed once per distinct header (`_npy_header`): `np.load` parses it every time, which
    was a third of the encoded loader's time."""
    try:
        shape, dtype, offset = _npy_layout(data)
        count = int(np.prod(shape))
        if len(data) - offset != count * dtype.itemsize:
            raise ValueError(f"{len(data) - offset} data bytes for shape {shape} of {dtype}")
        value = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
    except (ValueError, TypeError, SyntaxError) as error:
        raise AudioDecodeError("corrupt", f"{name}: {error}") from None
    if value.dtype == np.bool_:
        return torch.from_numpy(value.copy())
    value = value.astype(np.float32)
    if not np.isfinite(value).all():
        raise AudioDecodeError("corrupt", f"{name}: non-finite values")
    return torch.from_numpy(value)


def _npy_layout(data: bytes) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the data) of .npy bytes (format 1.0 or 2.0, C order, as `array_bytes` writes)."""
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not .npy data")
    size_bytes = 2 if data[6] == 1 else 4
    start = 8 + size_bytes
    offset = start + int.from_bytes(data[8:start], "little")
    shape, fortran_order, dtype = _npy_header(bytes(data[:offset]))
    if fortran_order:
        raise ValueError("Fortran-ordered arrays are not written by encode-shards")
    return shape, dtype, offset


@functools.lru_cache(maxsize=256)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(stream)


def check_encoding(found: dict, expected: dict, *, where: str) -> None:
    """Raises EncodingMismatchError naming both fingerprints (and which part differs) unless they agree."""
    if found.get("fingerprint") == expected["fingerprint"]:
        return
    parts = [part for part in ("vae", "conditioner", "audio") if found.get(part) != expected.get(part)]
    detail = ", ".join(f"{part} {found.get(part)} there, {expected.get(part)} here" for part in parts)
    raise EncodingMismatchError(
        f"{where}: these shards were encoded with other weights or another config (encoding fingerprint "
        f"{found.get('fingerprint')}; this model and config have {expected['fingerprint']}; differs: {detail}). "
        f"Encode the audio again with this config and checkpoint (encode-shards --config ... --ckpt ...), or "
        f"train with the weights the shards were encoded with")


def encoded_sample(members: dict[str, bytes], *, name: str, key: str, config: AudioConfig,
                   labels: LabelIndex | None, rng: np.random.Generator, expected: dict | None) -> dict:
    """One loader sample from an encoded sample's members (see the module docstring for the keys)."""
    for needed in (MEAN, LOGVAR, TEXT, schema.JSON_EXTENSION):
        if needed not in members:
            raise AudioDecodeError("incomplete", f"{name}: no {needed} (members {sorted(members)})")
    metadata = json.loads(members[schema.JSON_EXTENSION])
    if expected is not None:
        check_encoding(metadata.get(ENCODING, {}), expected, where=name)
    captions = metadata.get(schema.CAPTIONS) or [metadata.get(schema.CAPTION, "")]
    choice = choose_caption(captions, rng)
    texts = read_array(members[TEXT], name=f"{name}.{TEXT}")  # (captions, D) or (captions, tokens, D)
    if texts.shape[0] != len(captions):
        raise AudioDecodeError("corrupt", f"{name}: {texts.shape[0]} text encodings for {len(captions)} captions")
    posterior = torch.cat([read_array(members[MEAN], name=f"{name}.{MEAN}"),
                           read_array(members[LOGVAR], name=f"{name}.{LOGVAR}")])  # (2C, frames/f, mels/f)
    sample = {"posterior": posterior, "text_embedding": texts[choice]}
    if TEXT_MASK in members:
        sample["text_mask"] = read_array(members[TEXT_MASK], name=f"{name}.{TEXT_MASK}")[choice]
    if CLAP_AUDIO in members:
        sample["clap_audio"] = read_array(members[CLAP_AUDIO], name=f"{name}.{CLAP_AUDIO}")
    return sample | {
        "text": captions[choice],
        "fname": metadata.get(schema.SOURCE_PATH, key),
        "label_vector": torch.from_numpy(label_vector(metadata.get(schema.LABELS, []), labels)),
        "duration": config.duration,
        "sampling_rate": config.sampling_rate,
        "random_start_sample_in_original_audio_file": int(metadata.get(CROP_START, 0)),
        "key": key,
        "valid": True,
    }

"""`python -m audioldm_dist.features AUDIO --config CONFIG [--start SECONDS] --out OUT.npz`

Writes what the model sees for one file, computed the original way (crop at the file's rate, then
resample): arrays `waveform` (1, T), `log_mel_spec` (frames, mels) and `stft` (frames, bins). The
computation is the loader's own (`data/melspec.py`); this module is only its command line.
"""
from __future__ import annotations

import argparse

import numpy as np

from audioldm_dist.config import load_config
from audioldm_dist.data.audio import AudioDecodeError, decode, downmix
from audioldm_dist.data.melspec import MelFeatures, waveform_to_features


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m audioldm_dist.features",
                                     description="Write what the model sees for one audio file, the original way.")
    parser.add_argument("audio", help="an audio file (any rate, channels, format libsndfile reads)")
    parser.add_argument("--config", help="experiment YAML (its audio section is used); defaults if omitted")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--start", type=float, default=None,
                        help="crop start in seconds (default: the original random, silence-avoiding crop)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random crop when --start is not given")
    parser.add_argument("--out", required=True, help="output .npz with waveform, log_mel_spec, stft")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.set).audio
        waveform, sample_rate = decode(args.audio)
    except (ValueError, AudioDecodeError) as error:
        parser.exit(2, f"features: error: {error}\n")
    clip = waveform_to_features(downmix(waveform), sample_rate, config=config, mel=MelFeatures(config),
                                rng=np.random.default_rng(args.seed), start_seconds=args.start)
    np.savez(args.out, waveform=clip.waveform, log_mel_spec=clip.log_mel_spec.numpy(), stft=clip.stft.numpy())
    print(f"wrote {args.out}: waveform {clip.waveform.shape}, log_mel_spec {tuple(clip.log_mel_spec.shape)}, "
          f"stft {tuple(clip.stft.shape)}, crop start {clip.crop_start / sample_rate:.3f} s")


if __name__ == "__main__":
    main()

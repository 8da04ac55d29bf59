"""Installs the `audioldm_dist` library, the `shards` tool and the `make-shards` and `encode-shards` console scripts."""
from setuptools import find_packages, setup

setup(
    name="audioldm-dist",
    version="0.1.0",
    description="Cluster-scale training of AudioLDM-style text-to-audio latent diffusion models",
    python_requires=">=3.10",
    packages=find_packages(include=["audioldm_dist", "audioldm_dist.*", "shards", "shards.*", "launch"]),
    install_requires=[
        "torch>=2.4",
        "torchaudio>=2.4",
        "webdataset>=0.2.86",
        "soundfile>=0.12",
        "numpy>=1.24",
        "scipy>=1.10",
        "deepspeed>=0.15",
        "transformers>=4.40",
        "tokenizers>=0.19",
        "submitit>=1.5",
        "wandb>=0.17",
        "tqdm>=4.66",
        "pyyaml>=6.0",
        "matplotlib>=3.7",  # spectrogram images (colour, axes, caption) and the run report's plots
    ],
    extras_require={
        "xformers": ["xformers>=0.0.27"],
        # The tests also compare against the original's own modules (laion_clap, taming's LPIPS/discriminator):
        # scripts/setup_env.sh installs those without their dependencies (laion-clap pins numpy<2).
        "dev": ["pytest>=8.0", "pytest-timeout>=2.3", "librosa>=0.10", "scikit-learn>=1.3", "h5py>=3.8",
                "ftfy>=6.1", "wget>=3.2", "pandas>=2.0"],
    },
    entry_points={"console_scripts": ["make-shards=shards.cli:main", "encode-shards=shards.encode_cli:main"]},
)

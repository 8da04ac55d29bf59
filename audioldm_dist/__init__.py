"""audioldm-dist: cluster-scale training of AudioLDM-style text-to-audio latent diffusion models."""

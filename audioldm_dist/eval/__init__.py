"""Evaluation of generated audio with the AudioLDM papers' metrics (`python -m audioldm_dist.eval`).

Modules, one job each: `frechet` (Gaussian Fréchet distance, float64, stable for singular
covariances), `scores` (KL, inception score), `panns` / `vggish` (the backbone architectures with
their log-mel front ends, released parameter names), `backbones` (weights from the user's files or
random), `files` (listing, pairing by name, captions, decoding), `extract` (per-clip features),
`metrics` (folder-level numbers), `runs` (run directories and the summary table), `evaluate` and `cli`.
"""

"""Schedule, training objective, DDIM sampler and EMA: self-contained, no model code."""

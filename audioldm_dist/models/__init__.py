"""nn.Modules only: attention backends, UNet, VAE, vocoder, conditioners, released-checkpoint mapping."""

"""FAR in PyTorch: the VAE, the backbones, the heads, training and the reference sampler."""

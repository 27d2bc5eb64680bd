"""Training package: the shapes data, the autoencoder, the UNet, the text encoder, and ``ldm-train``."""

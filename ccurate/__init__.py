"""ccurate: Creative-Commons image-text datasets for latent diffusion."""

__version__ = "0.1.0"

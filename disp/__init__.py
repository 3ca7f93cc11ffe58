"""DiSP: Diffusion Self-Purification for multimodal masked-diffusion language models."""

__version__ = "0.1.0"

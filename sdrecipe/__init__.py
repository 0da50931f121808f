"""sdrecipe: declarative, streaming, reproducible Stable Diffusion checkpoint merges."""

__version__ = "0.1.0"

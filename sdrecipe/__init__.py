"""sdrecipe: declarative, streaming, reproducible Stable Diffusion checkpoint merges."""

__version__ = "0.1.0"

# Bump whenever the bytes sdrecipe writes for the same recipe and inputs change
# (arithmetic, metadata fields, layout): it is part of every tensor identity and
# of the lock's `built_from`, so outputs made by older code are rebuilt.
OUTPUT_FORMAT = 2

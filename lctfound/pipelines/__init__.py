"""Task pipelines in the style of diffusers: a model plus a scheduler plus ``__call__`` on arrays."""

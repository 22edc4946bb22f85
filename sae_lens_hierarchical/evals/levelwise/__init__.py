"""Levelwise eval: L0, density, dead latents, prefix explained variance, sparse probing and autointerp per level."""

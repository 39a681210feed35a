"""Zero-shot (VFM-Loc style) pieces: statistical alignment of the two views."""

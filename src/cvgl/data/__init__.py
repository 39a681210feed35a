"""Reading user imagery and camera metadata, and the warps relating drone photos to orthophotos."""

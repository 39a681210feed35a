"""Encoders: backbone + head (+ projection)."""

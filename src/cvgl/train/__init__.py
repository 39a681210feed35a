"""Training: losses (``loss``), batch samplers (``sampling``) and the loop (``trainer``).

Submodules are imported where used, so importing ``cvgl.train`` stays cheap.
"""

"""Training: the typed configuration, the Lightning module and data module, samplers, fit, DDP export.

The only package that imports Lightning.
"""

"""Glue layer: the only code that imports megatron.core or transformer_engine.

Submodules are imported on demand; importing this package imports nothing from megatron.
"""

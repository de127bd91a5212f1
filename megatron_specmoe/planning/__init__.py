"""Pure planning code: traces, predictors, balanced assignment, expert placement, measures.

Nothing under this package imports torch.distributed, megatron or transformer_engine
(tests/test_layers.py enforces it). Import the submodules you need; this file imports nothing.
"""

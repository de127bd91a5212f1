"""Communication layer: collectives and weight moves that take their process groups as arguments.

No megatron imports here, and no global parallel state: every function is handed its group.
"""

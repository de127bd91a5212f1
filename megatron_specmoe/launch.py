"""``python -m megatron_specmoe.launch SCRIPT.py ARGS...``: the public name of the Megatron-LM launcher.

The launcher lives in ``megatron_specmoe/megatron_lm/launch.py`` (see its docstring); this module only
keeps the documented ``-m megatron_specmoe.launch`` entry point and ``specmoe-launch`` working.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv=None) -> int:
    from megatron_specmoe.megatron_lm.launch import main as _main

    return _main(argv)


if __name__ == "__main__":
    sys.exit(main())

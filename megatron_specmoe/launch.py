"""``python -m megatron_specmoe.launch SCRIPT.py ARGS...``: the public name of the Megatron-LM launcher.

The launcher lives in ``megatron_specmoe/megatron_lm/launch.py`` (see its docstring); this module only
keeps the documented ``-m megatron_specmoe.launch`` entry point and ``specmoe-launch`` working,
and reports our errors as docs/cli_errors.md says: ``specmoe-launch: error: <what> -- <fix>``,
exit 2 for a bad command line (the launcher's or a --specmoe-* flag), 1 for a bad plan or an
environment that cannot run it (Python < 3.12); ``--debug`` (or ``SPECMOE_DEBUG=1``) before the
script shows the traceback instead. The script's own exceptions are not ours: they propagate with
their tracebacks.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv=None) -> int:
    import os

    from megatron_specmoe.entry import run_entry

    argv = sys.argv[1:] if argv is None else list(argv)
    debug, verbose = os.environ.get("SPECMOE_DEBUG", "") not in ("", "0"), False
    while argv and argv[0] in ("--debug", "--verbose"):
        debug, verbose = debug or argv[0] == "--debug", verbose or argv[0] == "--verbose"
        argv = argv[1:]

    def body() -> int:
        from megatron_specmoe.megatron_lm.launch import main as _main

        return _main(argv)

    return run_entry("specmoe-launch", body, debug=debug, verbose=verbose, only_ours=True)


if __name__ == "__main__":
    sys.exit(main())

"""The ``specmoe`` command line. Each subcommand lives in its own module (see ``main.py``)."""

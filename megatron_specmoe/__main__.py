"""``python -m megatron_specmoe`` is ``specmoe``."""

import sys

from megatron_specmoe.cli.main import main

sys.exit(main())

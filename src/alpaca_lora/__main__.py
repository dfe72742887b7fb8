"""``python -m alpaca_lora`` runs the ``alpaca-lora`` command."""

import sys

from alpaca_lora.cli.main import main

sys.exit(main())

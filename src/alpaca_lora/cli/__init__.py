"""The ``alpaca-lora`` command: flags generated from the typed configuration and the public signatures."""

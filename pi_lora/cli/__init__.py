"""The `pi-lora` command: the parser and exit codes (main), one function per command
(commands). Nothing inside pi_lora imports this package."""

from pi_lora.cli.main import main

__all__ = ["main"]

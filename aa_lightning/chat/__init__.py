"""``aa chat``: talk to a trained or exported model in the terminal (see :mod:`aa_lightning.chat.repl`)."""

from aa_lightning.chat.repl import main

__all__ = ["main"]

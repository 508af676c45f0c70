"""The one exception kvq-sim raises for bad input; the CLI turns it into one line on stderr, exit 2."""

from __future__ import annotations


class SimInputError(ValueError):
    """A user input (name, number, config file) that kvq-sim cannot use; the message says which and why."""

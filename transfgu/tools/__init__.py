"""Development tools (not part of the method): the supervised stand-in prior."""

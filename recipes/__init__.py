"""RMN training recipes (issue 3): the four-step schedule. Not implemented yet."""

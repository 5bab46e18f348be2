"""The programs behind ``launch/*``: argument parsing, one up-front run check, exit codes."""

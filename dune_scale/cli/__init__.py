"""The programs behind launch/*: argument parsing, exit codes, one up-front check."""

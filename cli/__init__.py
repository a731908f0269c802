"""The `fedtl` command line (cli/main.py is the entry point)."""

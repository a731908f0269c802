"""The `fedtl` command line (cli/main.py is the entry point) and its exit codes."""

# Exit codes a script can rely on (README, "Command line").
EXIT_OK = 0
EXIT_BUG = 1  # an unexpected error: a fedtl bug (the message says how to see the traceback)
EXIT_BAD_INPUT = 2  # a bad input, configuration or data: nothing was charged
EXIT_SITES_LEFT_OUT = 3  # the run finished, but some sites were refused or failed (the table names them)
EXIT_FEDERATION_FAILED = 4  # too few sites could take part or answered; the run can be resumed where it stopped
EXIT_ENVIRONMENT = 5  # the machine: a file that cannot be written (disk full, read-only, permissions)
EXIT_INTERRUPTED = 130

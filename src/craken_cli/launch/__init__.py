"""From a resolved spec to running workers: checks, rendered files, the command, the processes."""

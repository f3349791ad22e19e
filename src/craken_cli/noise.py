"""Known harmless warnings of the libraries under a run, dropped by exact message so that nothing
else is hidden (issue 21: a first CPU run printed each of these once per process).

    quiet_known_noise(cpu_processes)   # in each worker, before torch and DeepSpeed are imported
"""

from __future__ import annotations

import logging

# (logger, start of the message, CPU processes only): why each is harmless
KNOWN = (
    # torch.utils.cpp_extension at import, on a machine with a CUDA toolkit but CPU processes: no op
    # of a CPU run builds against CUDA
    ("torch.utils.cpp_extension", "No CUDA runtime is found", True),
    # DeepSpeed's WarmupLR read before its first step (at engine set-up): the lr is the warm-up's start
    ("DeepSpeed", "Attempting to get learning rate from scheduler before it has started", False),
)


class _DropMessage(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.start)


def quiet_known_noise(cpu_processes: bool) -> None:
    for name, start, cpu_only in KNOWN:
        if cpu_processes or not cpu_only:
            logging.getLogger(name).addFilter(_DropMessage(start))

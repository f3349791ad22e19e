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
    # torchao at import (transformers' quantizers import it wherever it is installed): its CUDA kernels
    # (.so files) do not load in a CPU process, and no CPU run uses them
    ("torchao", "Failed to load ", True),
    # torch's deprecation note for each enum torchao registers with pytree at import: about torchao's code
    ("torch.utils._pytree", "<enum '", False),
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
            _drop(name, start)


def quiet_logger(name: str) -> None:
    """KNOWN's notes of one logger, wherever it is about to speak (the CLI's own imports too)."""
    for logger, start, cpu_only in KNOWN:
        if logger == name and not cpu_only:
            _drop(name, start)


def _drop(name: str, start: str) -> None:
    # a filter, not a level: importing torch's compiler resets the levels of torch's loggers
    log = logging.getLogger(name)
    if not any(isinstance(f, _DropMessage) and f.start == start for f in log.filters):
        log.addFilter(_DropMessage(start))

"""How many training blocks the run's data set gives, known before launch (`craken train --auto`).

`blocks_available(spec)` counts the `seq_len`-token rows the workers will train on, exactly, by building
them with train/data.py and the run's tokenizer (into the data cache, which the workers then read): the
built-in data set always, local files up to LOCAL_EXACT_BYTES. Anything else (hub data sets, larger
files) is None: unknown, and large enough in practice to fill any micro-batch; the workers still check. The planner turns the count into
the largest micro-batch every process can fill (`memory.data_cap`).
"""

from __future__ import annotations

from pathlib import Path

LOCAL_EXACT_BYTES = 64 * 1024**2  # local data up to this size is tokenized before launch to count its blocks


def blocks_available(spec) -> int | None:
    """Blocks of `spec.data.seq_len` tokens the data set packs into (train and eval together), or None."""
    return rows_and_report(spec)[0]


def rows_and_report(spec) -> tuple[int | None, str]:
    """(blocks, train/data.Built.report(): the format, samples and what was skipped or cut) or (None, '')."""
    from ..train import builtin

    data = spec.data
    if data.streaming:
        return None, ""  # read while training, never counted
    if not builtin.is_builtin(data.dataset):
        path = Path(data.dataset).expanduser()
        if not path.exists() or _size(path) > LOCAL_EXACT_BYTES:
            return None, ""
    try:
        import datasets

        from ..train import data as data_mod
        from ..train import modeling

        datasets.disable_progress_bars()  # one line per split on the CLI's stderr, before craken's own output
        tokenizer = modeling.load_tokenizer(spec)
        built = data_mod.cached_build(spec, tokenizer)  # the workers then read the cache
        return len(built.rows), built.report()
    except Exception:  # unreadable data or tokenizer: preflight and the workers report it with a fix
        return None, ""


def _size(path: Path) -> int:
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.is_file()]
    return sum(p.stat().st_size for p in files)


def micro_batch_cap(spec, fixed_micro_batch: int | None = None) -> int | None:
    """The largest micro-batch every process can fill (None: unknown); a data set too small for the run
    (or for the micro-batch the user fixed) is a CrakenError naming what to change, before launch."""
    from ..errors import CrakenError
    from .memory import data_cap, data_problem, train_blocks

    blocks = blocks_available(spec)
    if blocks is None:
        return None
    from ..train.data import held_out_fraction

    train = train_blocks(blocks, held_out_fraction(spec))
    world = spec.cluster.num_processes or 1
    problem = data_problem(train, world, spec.data.seq_len, fixed_micro_batch)
    if problem:
        raise CrakenError(problem, title="data set too small")
    return data_cap(train, world)

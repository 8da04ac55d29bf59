"""The worker pool that make-shards and encode-shards share: one task per shard, results unordered.

Workers are separate processes started with `forkserver` (torch's thread pools deadlock after a plain
fork), each single-threaded. A task reports progress with `report(num_files, seconds)`; in workers that
goes through a queue drained by a thread of the parent, in-process (`workers=1`) straight to the callback,
so the caller's tqdm bar is fed the same way in both cases. The pool is terminated whatever happens.
"""
from __future__ import annotations

import multiprocessing as mp
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

ProgressCallback = Callable[[int, float], None]

_sink: Callable[[tuple[int, float]], None] | None = None


def report(num_files: int, seconds: float) -> None:
    """Progress from inside a task (a worker or the parent)."""
    if _sink is not None:
        _sink((num_files, seconds))


def _init_worker(queue: mp.Queue, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    import torch

    torch.set_num_threads(1)
    global _sink
    _sink = queue.put
    if initializer is not None:
        initializer(*initargs)


@contextmanager
def task_runner(*, workers: int, preload: list[str], progress: ProgressCallback | None,
                initializer: Callable[..., None] | None = None, initargs: tuple = ()
                ) -> Iterator[Callable[[Callable[[Any], Any], Iterable[Any]], Iterator[Any]]]:
    """Yields `run(function, tasks)`, an iterator over results in completion order. `function` must be a
    module-level function of a module named in `preload` (imported once, in the fork server);
    `initializer(*initargs)` runs once in each worker (in-process: once, now)."""
    global _sink
    if workers <= 1:
        import torch

        # one thread, as in the workers: float sums in another order would change the bytes written
        threads, _ = torch.get_num_threads(), torch.set_num_threads(1)
        if initializer is not None:
            initializer(*initargs)
        previous, _sink = _sink, (lambda item: progress(*item)) if progress is not None else None
        try:
            yield lambda function, tasks: (function(task) for task in tasks)
        finally:
            _sink = previous
            torch.set_num_threads(threads)
        return
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(preload)
    queue = context.Queue()
    pool = context.Pool(workers, initializer=_init_worker, initargs=(queue, initializer, initargs))

    def drain_queue() -> None:
        while (item := queue.get()) is not None:
            if progress is not None:
                progress(*item)

    drain = threading.Thread(target=drain_queue, daemon=True)
    drain.start()
    try:
        yield lambda function, tasks: pool.imap_unordered(function, list(tasks))
        queue.put(None)
        drain.join()
    finally:
        pool.terminate()
        pool.join()

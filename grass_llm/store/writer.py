"""A background chunk writer: the cache job's step loop hands finished row chunks to a thread
and goes on computing, so it never waits on disk (or an object store) unless the writer falls
behind by more than ``max_pending`` chunks.

Failure semantics: a chunk counts only once ``write_chunk`` has marked it done (data first, the
marker last), so a writer error loses nothing already marked done. The first error stops the
writer; the loop sees it at its next ``submit`` (or at ``close``) and raises it, so the run
stops instead of computing chunks that cannot be stored.

The thread must run no parallel torch op: one would give it an OpenMP team of its own, and
while that team lives (as long as the thread: the whole job) every parallel op of the step
loop runs slower. ``GradientStore.write_chunk`` encodes rows staged in the store's dtype with
numpy for that reason (``tests/test_store.py`` counts the threads).
"""

from __future__ import annotations

import queue
import threading

from grass_llm.store.store import GradientStore

_STOP = object()


class ChunkWriter:
    """Writes row chunks of ``store`` in a thread, in submission order.

    Args:
        store: an open store (mode ``"r+"``).
        max_pending: chunks queued beyond the one being written; ``submit`` blocks while the
            queue is full (this bounds host memory: at most ``max_pending + 1`` chunks held
            by the writer).
    """

    def __init__(self, store: GradientStore, max_pending: int = 1):
        self.store = store
        self.written = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, max_pending))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="grass-llm-chunk-writer",
                                        daemon=True)
        self._thread.start()

    def submit(self, c: int, **write_kwargs) -> None:
        """Queue chunk ``c`` for ``store.write_chunk(c, **write_kwargs)``; raises the writer's
        error if an earlier chunk failed."""
        self._raise()
        while True:
            try:
                self._queue.put((c, write_kwargs), timeout=0.5)
                return
            except queue.Full:
                self._raise()  # the writer died while we waited for room

    def close(self) -> int:
        """Wait for every queued chunk; raises the writer's error. Returns chunks written."""
        self._queue.put(_STOP)
        self._thread.join()
        self._raise()
        return self.written

    def abort(self) -> None:
        """Stop after the chunk being written (used when the loop itself failed): chunks still
        queued are dropped, none is half marked."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(_STOP)
        self._thread.join(timeout=600)

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._error is not None:
                continue  # drain: the loop will raise the first error
            c, kwargs = item
            try:
                self.store.write_chunk(c, **kwargs)
                self.written += 1
            except BaseException as err:  # noqa: BLE001 - handed to the loop's thread
                self._error = err

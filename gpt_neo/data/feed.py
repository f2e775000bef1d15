"""Batches on the device before the step needs them.

A background thread takes batches from the input pipeline and places them on the mesh, keeping
up to `depth` ready (double buffering at depth 2): the training loop only ever waits for a
batch when the pipeline is slower than the step. Each batch travels with the pipeline's
position after it, so a checkpoint records the position of the last batch a step *consumed*,
not of the batches prefetched past it, and a resumed run sees exactly the batches an
uninterrupted one would.

Written by hand rather than with tf.data's own prefetch: the pipeline's position (which
makes resume exact) lives in Python, and the placement on the mesh is JAX's.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from gpt_neo.data.batch import Batch


class DeviceFeed:
    """`next()` -> (batch on device, pipeline position after it); `close()` stops the thread.

    `produce()` returns the next host batch and `position()` the pipeline's position after it
    (a snapshot); `place(host_batch)` puts it on the devices. An error in the pipeline is
    raised by the `next()` that would have returned its batch.
    """

    def __init__(
        self,
        produce: Callable[[], Batch],
        position: Callable[[], dict],
        place: Callable[[Batch], object],
        depth: int = 2,
    ):
        self._produce, self._position, self._place = produce, position, place
        self._ready: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self.waited = 0.0  # seconds `next()` spent waiting for a batch, since the last reset
        self._thread = threading.Thread(target=self._fill, name="gpt-neo-feed", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                host_batch = self._produce()
                self._put((self._place(host_batch), self._position()))
        except BaseException as err:  # handed to the consumer, raised where its batch was due
            self._put(err)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self):
        start = time.perf_counter()
        item = self._ready.get()
        self.waited += time.perf_counter() - start
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def take_waited(self) -> float:
        """Seconds spent waiting for batches since the last call."""
        waited, self.waited = self.waited, 0.0
        return waited

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._ready.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=30)

    def __enter__(self) -> DeviceFeed:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

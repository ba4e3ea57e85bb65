"""Tiles of one slide after another as batches, read in a background thread.

    stream = TileStream(reader, [(slide_key, segment item, n_tiles), ...], batch_size=64)
    for ev in stream:            # TileBatch(key, items, pixels uint8 (b, 3, H, W), last) | SlideFailed
        ...                      # the forward pass runs here while the thread reads ahead
    stream.read_s                # seconds the thread spent reading (not waiting for room)

The thread reads the slides in order through the tiler's reader (histodist.ingest.sources.wsi
.WsiReader: the tile plan of the survey, regions read ahead by the tiler's read_tiles threads,
resized with antialiasing, the tile JSON fields), stacks each slide's tiles into batches of at
most `batch_size` (a batch never holds two slides, so a slide's vectors do not depend on which
other slides a process embeds or skips) and queues up to `prefetch` batches. When it has
queued a slide's last batch it opens the next slide and reads on, so the next slide's regions
are read while the current one is embedded: on a GPU the reading is hidden when it is faster
than the model. A slide that fails while read gives a SlideFailed event after the batches
already read; other errors stop the stream and are raised in the consumer.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass

import numpy as np
import torch

from histodist.ingest.sources import Item, Reader

POLL_S = 0.1  # how often a blocked producer checks whether the consumer has stopped


@dataclass
class TileBatch:
    """Tiles of one slide: `items` (the tiler's tile Items: key, label, group, JSON fields) and
    `pixels` uint8 (b, 3, H, W) on the CPU (pinned when CUDA is present); `last`: the slide's
    final batch."""

    key: str
    items: list[Item]
    pixels: torch.Tensor
    last: bool


@dataclass
class SlideFailed:
    """The slide `key` could not be read to its end: `reason`."""

    key: str
    reason: str


_END = object()


class TileStream:
    """Iterate over TileBatch / SlideFailed events of `slides` ((key, segment Item for the
    reader, expected tile count) each, in order); see the module docstring."""

    def __init__(self, reader: Reader, slides: Sequence[tuple[str, Item, int]], *,
                 batch_size: int, prefetch: int = 4):  # fmt: skip
        self.reader, self.slides, self.batch_size = reader, list(slides), max(1, batch_size)
        self.queue: queue.Queue = queue.Queue(max(1, prefetch))
        self.stop = threading.Event()
        self.read_s = 0.0  # the thread's time reading and stacking, waits for room excluded
        self.pin = torch.cuda.is_available()

    def __iter__(self) -> Iterator[TileBatch | SlideFailed]:
        thread = threading.Thread(target=self._run, name="tile-stream", daemon=True)
        thread.start()
        try:
            while (ev := self.queue.get()) is not _END:
                if isinstance(ev, BaseException):
                    raise ev
                yield ev
        finally:
            self.stop.set()
            thread.join()

    # ------------------------------------------------------------------ the reading thread
    def _run(self) -> None:
        try:
            for key, segment, expected in self.slides:
                if not self._slide(key, segment, expected):
                    return
        except BaseException as e:  # handed to the consumer, which raises it
            self._put(e)
        self._put(_END)

    def _slide(self, key: str, segment: Item, expected: int) -> bool:
        """Queue one slide's batches (or its failure); False when the consumer stopped."""
        t0 = time.perf_counter()
        with closing(self.reader.read([segment])) as tiles:  # the slide closed on every exit
            return self._batches(key, tiles, expected, t0)

    def _batches(self, key: str, tiles, expected: int, t0: float) -> bool:
        items, pixels, sent = [], [], 0
        for item, px in tiles:
            if isinstance(px, Exception):
                self.read_s += time.perf_counter() - t0
                return self._put(SlideFailed(key, str(px)))
            items.append(item)
            pixels.append(px)
            if len(items) == self.batch_size and sent + len(items) < expected:
                t0, ok = self._flush(key, items, pixels, False, t0)
                sent, items, pixels = sent + len(items), [], []
                if not ok:
                    return False
        if sent + len(items) != expected:
            self.read_s += time.perf_counter() - t0
            return self._put(SlideFailed(key, f"read {sent + len(items)} tiles, the plan has "
                                              f"{expected}"))  # fmt: skip
        return self._flush(key, items, pixels, True, t0)[1]

    def _flush(self, key, items, pixels, last, t0) -> tuple[float, bool]:
        x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()
        if self.pin:
            x = x.pin_memory()
        self.read_s += time.perf_counter() - t0
        ok = self._put(TileBatch(key, list(items), x, last))
        return time.perf_counter(), ok

    def _put(self, ev) -> bool:
        """Queue `ev`, waiting for room; False (nothing queued) once the consumer stopped."""
        while not self.stop.is_set():
            try:
                self.queue.put(ev, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

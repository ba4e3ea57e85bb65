"""histodist.embed whose slide reader takes 0.1 s per batch of tiles (storage slower than the
model), so that a test can kill it while slides are still being embedded. Used by
tests/test_embed_slides.py.

    python tests/scripts/slow_slides.py <histodist.embed flags>
"""

import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # this checkout's package
from histodist import embed  # noqa: E402
from histodist.inference.tile_stream import TileStream  # noqa: E402

flush = TileStream._flush


def slow_flush(self, *args):
    time.sleep(0.1)
    return flush(self, *args)


TileStream._flush = slow_flush
sys.exit(embed.main(sys.argv[1:]))

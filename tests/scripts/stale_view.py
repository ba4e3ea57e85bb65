"""histodist.train on a rank whose view of the shared file system lags (as an NFS client's
attribute cache can): on every rank but 0, Path.is_file / is_dir report nothing under
`checkpoints/`. Used by tests/test_train_ddp.py to check that ranks resume from what the main
process sees.

    accelerate launch ... tests/scripts/stale_view.py <histodist.train flags>
"""

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # this checkout's package
from histodist import train  # noqa: E402

if int(os.environ.get("RANK", "0")) != 0:
    for name in ("is_file", "is_dir"):
        real = getattr(pathlib.Path, name)

        def hidden(self, _real=real):
            return False if "/checkpoints" in str(self) else _real(self)

        setattr(pathlib.Path, name, hidden)

sys.exit(train.main(sys.argv[1:]))

"""The run record: what a probe writes and how a run is read back.

* :mod:`.keys`: the names of every logged scalar (``nc-{probe}/{layer}/{metric}``, ...).
* :mod:`.snapshots`: per-probe snapshot files (class moments and fits behind a row).

Writers (the callback) and readers (``report``, ``study``, ``measure``) use only these.
"""

from nclightning.record import keys, snapshots

__all__ = ["keys", "snapshots"]

"""The run record: one owner of what a run writes and how it is read back.

* :mod:`.keys`: the name of every logged scalar (``nc-{probe}/{layer}/{metric}``,
  ``pm-{probe}-{h0}->{h}/...``, ``epochs_trained``) and its parser;
* :mod:`.snapshots`: per-probe snapshot files (the statistics behind a row), owned folders;
* :mod:`.runs`, :mod:`.history`, :mod:`.groups`: reading run folders back (versions, resume
  chains and their stitching, one x-axis of completed epochs, seeds of one setting);
* :mod:`.views`, :mod:`.figures`: plain-data views of the rows and the named figures that
  ``nclightning report`` writes and the callback logs to W&B.

Writers (the callback, the loggers) and readers (``report``, ``study``, ``measure``) use only
these modules for keys, files and runs.
"""

from nclightning.record import keys, snapshots

__all__ = ["keys", "snapshots"]

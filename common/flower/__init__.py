"""Flower's runtime behind one door: every private Flower module fedseg uses, and every patch of one.

fedseg's apps read like Flower's examples: ``flwr.app`` records and
messages, ``flwr.serverapp`` (Grid, ServerApp, strategies), ``flwr.clientapp``.
Where fedseg needs more of Flower 1.42 than that public surface, it comes
through this package and nowhere else (tests/test_flower_runtime.py scans
common/, server/, client/ and simulations/ for any other import of a private
Flower module and any assignment into a Flower object):

- re-exports of private names: :mod:`.constants`, :mod:`.messages`,
  :mod:`.secure_aggregation`, :mod:`.differential_privacy`, :mod:`.fab`,
  :mod:`.control` (the SuperLink's Control API);
- patches of Flower's processes: :mod:`.object_pulls` (the pull back-off),
  :mod:`.supernode` (the SuperNode's sleeps and pull moments),
  :mod:`.clientapp_runner` (the bundle guard in place of Flower's install and
  app-folder lookup);
- Grid decorators over the public Grid: :mod:`.grid`.

Every one was written against ``FLOWER_VERSION``; the test checks the
installed Flower is that version and that every patched target still has the
shape its patch expects, so an upgrade fails there, by name, and not in a
hospital. This package imports nothing at import time: the SuperNode and the
bundle guard load only the module they need.
"""

FLOWER_VERSION = "1.42"
"""The Flower release (major.minor) every module of this package was written and checked against."""

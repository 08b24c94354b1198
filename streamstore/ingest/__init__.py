"""The ingest daemon: ZeroMQ frames in, counted and compressed HDF5 series out.

Modules, in data-flow order:

* :mod:`~streamstore.ingest.config` - what a daemon is told (:class:`IngestConfig`);
* :mod:`~streamstore.ingest.daemon` - sockets, signals, threads (:class:`IngestDaemon`);
* :mod:`~streamstore.ingest.machine` - the per-series state machine, without sockets;
* :mod:`~streamstore.ingest.series` - frame-id accounting and the reorder window;
* :mod:`~streamstore.ingest.pipeline` - the stages after the socket
  (:mod:`~streamstore.ingest.items` items, memory budget and stage thread;
  :mod:`~streamstore.ingest.count_stage`; :mod:`~streamstore.ingest.write_stage`);
* :mod:`~streamstore.ingest.status` - counters, the live line, JSON over PUB;
* :mod:`~streamstore.ingest.safety` - loopback-only binds, safe output paths.

Nothing heavy is imported here (zmq, numba and h5py load when a daemon runs).
"""

from __future__ import annotations

from streamstore.ingest.config import IngestConfig
from streamstore.ingest.daemon import IngestDaemon

__all__ = ["IngestConfig", "IngestDaemon"]

"""Scale-out ingest: one camera stream over several ingest workers.

* :mod:`streamstore.scaleout.deal` -- stream endpoints and the dealing rule;
* :mod:`streamstore.scaleout.broker` -- the broker that owns the camera's
  stream and deals it over the workers (``streamstore fanout``, and the
  parent process of ``streamstore ingest --workers N``);
* :mod:`streamstore.scaleout.local` -- the broker plus ``N`` local worker
  processes;
* :mod:`streamstore.scaleout.shard_writer` -- a worker's shard and the
  series manifest.

The design and why: ``docs/scaling.md`` and ``docs/protocol.md``. Nothing
heavy is imported here.
"""

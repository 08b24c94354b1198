"""The stored series: the HDF5 event format, writing it and reading it back.

* :mod:`streamstore.store.codec` -- the Blosc2 chunk codec of event columns;
* :mod:`streamstore.store.checksum` -- per-chunk checksums;
* :mod:`streamstore.store.writer` -- :class:`StoreWriter`, one series file;
* :mod:`streamstore.store.reader` -- :class:`Store`, reading a file;
* :mod:`streamstore.store.shards` -- a series written as several shard files;
* :mod:`streamstore.store.verify` -- checking every chunk of a series.

The format is documented in ``docs/format.md``. Nothing heavy is imported here.
"""

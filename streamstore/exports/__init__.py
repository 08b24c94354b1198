"""Exports of a stored series to the files other tools read.

* :mod:`streamstore.exports.images` -- TIFF and npy image stacks;
* :mod:`streamstore.exports.eer` -- EER, as Falcon cameras write;
* :mod:`streamstore.exports.stempy_io` -- stempy's sparse HDF5 (both ways);
* :mod:`streamstore.exports.libertem_io` -- LiberTEM's ``raw_csr``;
* :mod:`streamstore.exports.progress` -- progress bars for long exports.

Nothing heavy is imported here.
"""

"""Analysis of stored series: 4D-STEM reductions, dask, figures.

* :mod:`streamstore.analysis.stem` -- virtual detectors, centre of mass,
  diffraction sums and radial profiles over a scan (the same are methods of a
  store, :mod:`streamstore.store.scan_methods`, which forwards to these);
* :mod:`streamstore.analysis.distributed` and
  :mod:`streamstore.analysis.stem_dask` -- the same on a dask cluster;
* :mod:`streamstore.analysis.plotting` and :mod:`streamstore.analysis.stem_plot`
  -- summary and virtual-image figures.

Nothing heavy is imported here.
"""

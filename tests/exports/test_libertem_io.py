"""LiberTEM's own raw_csr reader on the export: its UDFs give our sums and images."""

from __future__ import annotations

import numpy as np
import pytest

import streamstore
from streamstore.exports.libertem_io import export_raw_csr
from tests.analysis.test_stem import FRAME, make_scan_store

api = pytest.importorskip("libertem.api")


def run_udfs(toml):
    from libertem.udf.sum import SumUDF
    from libertem.udf.sumsigudf import SumSigUDF

    with api.Context.make_with("inline") as ctx:
        ds = ctx.load("raw_csr", path=str(toml))
        res = ctx.run_udf(dataset=ds, udf=[SumUDF(), SumSigUDF()])
    return np.asarray(res[0]["intensity"].data), np.asarray(res[1]["intensity"].data), ds


def test_sum_udf_equals_store_sum(tmp_path):
    path, _d, _i = make_scan_store(tmp_path / "s.h5", fpp=1, flyback=0, seed=7)
    toml = export_raw_csr(path, tmp_path / "s_csr")
    assert toml.name == "s_csr.toml"
    total, per_position, ds = run_udfs(toml)
    with streamstore.open(path) as st:
        assert tuple(ds.shape.nav) == st.scan.scan_shape
        np.testing.assert_array_equal(total, st.sum())
        np.testing.assert_array_equal(per_position, st.virtual_image(mask=np.ones(FRAME, bool)))
    with pytest.raises(FileExistsError):
        export_raw_csr(path, toml)


def test_frames_per_position_flyback_and_lost_frames(tmp_path):
    path, _d, _i = make_scan_store(tmp_path / "f.h5", fpp=3, flyback=1, seed=8, drop=(4, 30))
    toml = export_raw_csr(path, tmp_path / "f.toml")
    total, per_position, _ds = run_udfs(toml)
    with streamstore.open(path) as st:
        np.testing.assert_array_equal(total, st.diffraction_sum())
        np.testing.assert_array_equal(per_position, st.virtual_image(mask=np.ones(FRAME, bool)))
        assert total.sum() < st.sum().sum()  # the flyback frames are not in the scan


def test_cli_export_libertem(tmp_path):
    from tests._cli_data import cli, cli_here

    path, _d, _i = make_scan_store(tmp_path / "c.h5", fpp=1, flyback=1, seed=9)
    res = cli("export", path, "--format", "libertem", tmp_path / "c_csr")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"wrote {tmp_path / 'c_csr.toml'}: LiberTEM raw_csr, nav 5x7"
    total, _per, _ds = run_udfs(tmp_path / "c_csr.toml")
    with streamstore.open(path) as st:
        np.testing.assert_array_equal(total, st.diffraction_sum())
    again = cli_here("export", path, "--format", "libertem", tmp_path / "c_csr.toml")
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert (
        cli_here("export", path, "-f", "libertem", tmp_path / "c_csr", "--overwrite").returncode
        == 0
    )
    bad = cli_here("export", path, "-f", "libertem", tmp_path / "d", "--start", "3")
    assert bad.returncode == 2 and "--start does not apply" in bad.stderr

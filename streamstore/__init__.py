"""streamstore: keep up with a direct-detection electron camera.

Data flow, one folder per stage (``docs/architecture.md``)::

    camera -> link -> ingest -> counting -> store -> analysis, exports -> cli

Importing this package is cheap: the public names below are resolved lazily
(PEP 562), so no numba compilation, thread pool, file or socket work happens
until a name is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "EventBatch": "streamstore.events",
    "Calibration": "streamstore.counting.calibration",
    "count": "streamstore.counting",
    "CameraEmulator": "streamstore.camera.emulator",
    "ProtocolError": "streamstore.link.protocol",
    "CorruptDataError": "streamstore.errors",
    "StoreWriter": "streamstore.store.writer",
    "Store": "streamstore.store.reader",
    "open": "streamstore.store.open",
    "import_stempy": "streamstore.exports.stempy_io",
    "export_stempy": "streamstore.exports.stempy_io",
    "export_eer": "streamstore.exports.eer",
    "ScanGeometry": "streamstore.scan",
    "STEMSpecimen": "streamstore.camera.specimen",
    "export_raw_csr": "streamstore.exports.libertem_io",
}

__all__ = [
    "CameraEmulator",
    "Calibration",
    "CorruptDataError",
    "EventBatch",
    "ProtocolError",
    "STEMSpecimen",
    "ScanGeometry",
    "Store",
    "StoreWriter",
    "__version__",
    "count",
    "export_eer",
    "export_raw_csr",
    "export_stempy",
    "import_stempy",
    "open",
]

if TYPE_CHECKING:  # pragma: no cover
    from streamstore.camera.emulator import CameraEmulator
    from streamstore.camera.specimen import STEMSpecimen
    from streamstore.counting import count
    from streamstore.counting.calibration import Calibration
    from streamstore.errors import CorruptDataError
    from streamstore.events import EventBatch
    from streamstore.exports.eer import export_eer
    from streamstore.exports.libertem_io import export_raw_csr
    from streamstore.exports.stempy_io import export_stempy, import_stempy
    from streamstore.link.protocol import ProtocolError
    from streamstore.scan import ScanGeometry
    from streamstore.store.open import open
    from streamstore.store.reader import Store
    from streamstore.store.writer import StoreWriter


def __getattr__(name: str) -> Any:
    try:
        module = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'streamstore' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__

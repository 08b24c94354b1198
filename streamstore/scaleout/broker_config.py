"""What a broker is told: the camera, its workers' endpoints, blocks and bounds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streamstore.errors import UserError
from streamstore.scaleout.deal import DEFAULT_BLOCK_FRAMES, stream_endpoints

__all__ = ["BrokerConfig"]


@dataclass
class BrokerConfig:
    """What a :class:`Broker` needs (picklable).

    Parameters
    ----------
    camera : str
        The camera's endpoint.
    workers : list of str
        Endpoints to bind, one PUSH socket per worker (``N = len(workers)``).
    camera_bind : bool, default False
        Bind ``camera`` (a camera that connects) instead of connecting to it.
    block_frames : int, default 8
        Consecutive frames dealt to one worker.
    curve_keys : str, optional
        Key directory (``streamstore keys``): the camera link is a CURVE server
        admitting ``DIR/authorized_clients``, as ``ingest --curve-keys``.
    curve_client : str, optional
        Name of a key pair in ``curve_keys``: the worker links become CURVE
        clients of the workers' ``ingest --curve-keys DIR`` (remote workers).
    max_frame_bytes : int
        Largest image accepted from the camera.
    sndhwm, rcvhwm : int, default 2
        High-water marks (messages) of the worker and camera sockets; small,
        so back-pressure reaches the camera quickly and little is in flight.
    heartbeat_s : float, default 1.0
        ZeroMQ heartbeat of the worker links; a worker silent for five
        intervals counts as lost.
    status_endpoint : str, optional
        Bind a PUB socket and publish the broker's status as JSON.
    status_interval_s : float, default 5.0
        Seconds between status log lines.
    exit_after_series : int, optional
        Stop once this many ``end`` messages were passed on and every worker
        has disconnected (at most ``drain_s`` later).
    ready_timeout_s : float, optional
        Give up (:class:`TimeoutError`) if the workers are not all connected
        within this time; None waits.
    orphans_dir : str, optional
        The output directory: rejections that no ``end`` carried into a
        series manifest are written to ``orphans_dir/orphans.json`` when the
        broker stops. None: they are logged (ERROR) and in the status only.
    """

    camera: str
    workers: list[str]
    camera_bind: bool = False
    block_frames: int = DEFAULT_BLOCK_FRAMES
    curve_keys: str | None = None
    curve_client: str | None = None
    max_frame_bytes: int = 4092 * 5760 * 2
    sndhwm: int = 2
    rcvhwm: int = 2
    heartbeat_s: float = 1.0
    status_endpoint: str | None = None
    status_interval_s: float = 5.0
    exit_after_series: int | None = None
    ready_timeout_s: float | None = None
    linger_s: float = 10.0
    drain_s: float = 60.0
    orphans_dir: str | None = None

    def check(self) -> None:
        """Raise :class:`UserError` naming the first bad option."""
        if "://" not in self.camera:
            raise UserError(f"--connect: {self.camera!r} is not a ZeroMQ endpoint")
        if not self.workers:
            raise UserError("--workers must be >= 1")
        if self.block_frames < 1:
            raise UserError(f"--block-frames must be >= 1, got {self.block_frames}")
        if self.curve_client is not None and self.curve_keys is None:
            raise UserError("--curve-client needs --curve-keys DIR")
        if self.curve_keys is not None:
            from streamstore.link.security import check_keys_dir

            check_keys_dir(self.curve_keys)
        if self.exit_after_series is not None and self.exit_after_series < 1:
            raise UserError(f"--exit-after-series must be >= 1, got {self.exit_after_series}")

    @classmethod
    def for_listen(cls, camera: str, listen: str, n: int, **kwargs: Any) -> BrokerConfig:
        """Worker endpoints ``listen``, ``listen`` + 1, ... (``streamstore fanout``)."""
        return cls(camera=camera, workers=stream_endpoints(listen, n), **kwargs)

"""Frame sources: the camera emulator and the specimens it images.

* :mod:`streamstore.camera.emulator` -- :class:`CameraEmulator`, simulated
  electron frames, streamed over the link;
* :mod:`streamstore.camera.truth` -- :class:`Truth`, where every electron landed;
* :mod:`streamstore.camera.specimen` -- a scanned specimen for 4D-STEM runs.

Nothing heavy is imported here.
"""

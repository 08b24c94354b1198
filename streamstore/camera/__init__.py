"""Frame sources: the camera emulator and the specimens it images.

* :mod:`streamstore.camera.emulator` -- :class:`CameraEmulator`, simulated
  electron frames with their ground truth, streamed over the link;
* :mod:`streamstore.camera.specimen` -- a scanned specimen for 4D-STEM runs.

Nothing heavy is imported here.
"""

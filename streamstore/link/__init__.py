"""The camera link: what travels over ZeroMQ and how the sockets are set up.

* :mod:`streamstore.link.protocol` -- the messages (start, image, end): their
  fields, validation, encoding and parsing;
* :mod:`streamstore.link.sockets` -- the sending and receiving sockets;
* :mod:`streamstore.link.security` -- CURVE keys for authenticated links.

The wire format is documented in ``docs/protocol.md``. Nothing heavy is
imported here.
"""

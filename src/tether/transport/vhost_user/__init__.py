"""vhost-user back-end: QEMU's virtio-net rings in shared guest memory.

Public API::

    device = VhostUserNetDevice(loop, port, state=handler)   # a frames.FrameSink
    server = VhostUserServer(loop, "/run/tether.sock", device)

Layout, from the socket down to guest memory:

    server.py          the listening socket; one front-end at a time
    connection.py      a front-end's socket: messages and their fds in, replies out
    protocol.py        the wire: message framing, payload layouts, feature bits (sans-IO)
    fds.py             what each received fd must be before it is used
    device.py          VhostUserNetDevice: request dispatch, the control side
    state_transfer.py  SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE pipe I/O
    datapath.py        RX and TX over the two virtqueues (the FrameSink side)
    virtqueue.py       one split virtqueue: chains, used elements, notifications
    memory.py          the guest memory table and the dirty log

examples/vhost_user_responder.py is a whole back-end on this API.
"""

from .device import VhostUserNetDevice
from .server import VhostUserServer

__all__ = ["VhostUserNetDevice", "VhostUserServer"]

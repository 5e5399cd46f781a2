"""vhost-user back-end: QEMU's virtio-net rings in shared guest memory.

Public API::

    device = VhostUserNetDevice(loop, port, state=handler)   # a frames.FrameSink
    server = VhostUserServer(loop, "/run/tether.sock", device)
"""

from .device import VhostUserNetDevice, VhostUserServer

__all__ = ["VhostUserNetDevice", "VhostUserServer"]

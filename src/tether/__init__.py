"""tether: a user-mode network back-end for virtual machines.

QEMU attaches a guest's virtio-net card over vhost-user; tether terminates the
guest's traffic and carries it over ordinary host sockets, and hands its state
to another tether instance when the VM live-migrates.
"""

__version__ = "0.1.0"

"""The user-mode network stack: guest frames in, ordinary host sockets out.

`Stack` (net.stack) is the entry point: a transport hands it frames as a
`frames.GuestPort` and gives it a `frames.FrameSink` for frames to the guest.
This package never imports `tether.transport`.

Layers, each importing only those below it: stack -> translators (tcp, udp,
icmp) -> context (the NetContext they see of the stack), tcp_core -> tcp_state
-> tcp_record, flows, output, params, sockets.
"""

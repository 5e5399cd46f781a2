"""What tether hands over when its VM live-migrates.

`migrate/` is the generic stream; this package is tether's content for it:
the payload layouts of its stages (`records`), its table of versions
(`format`), and the binding of those stages to a running daemon's state, the
network stack and its TCP sockets (`device_state`).
"""

"""Transports: how Ethernet frames reach the guest (tap, stream, vhost-user)."""

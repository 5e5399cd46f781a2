"""Transports: ways frames reach a guest (vhost-user, stream, tap)."""

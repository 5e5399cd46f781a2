"""The versioned migration stream that carries tether's state between instances."""

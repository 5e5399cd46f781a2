"""Programs built on tether's libraries (not installed with it)."""

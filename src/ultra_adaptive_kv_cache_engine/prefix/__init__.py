"""prefix layer."""

"""compression layer."""

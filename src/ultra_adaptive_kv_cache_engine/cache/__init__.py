"""L3 cache layer: the seed's caches and the facade the engine talks to."""

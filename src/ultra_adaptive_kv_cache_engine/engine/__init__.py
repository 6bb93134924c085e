"""L4 engine: the seed's front object, requests, the model session and the adaptive controllers."""

"""One module per API family; each maps a request to a cache key and a response."""

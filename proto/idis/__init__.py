"""Wire contract of the identifier resolution service (generated from proto/idis)."""

"""The device mesh, the sharding rules, and the multi-process runtime."""

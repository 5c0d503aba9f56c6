"""Scale-out: logical sharding rules and meshes, multi-host start-up, memory and speed bounds."""

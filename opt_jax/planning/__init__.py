"""Planning above the model: memory plans and speed bounds (FLOPs, bytes, device peaks)."""

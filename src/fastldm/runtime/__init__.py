"""Runtime: device/dtype handling, memory planning, CUDA graphs."""

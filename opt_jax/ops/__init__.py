"""Pure array functions under the layers: attention kernels and quantised matmuls."""

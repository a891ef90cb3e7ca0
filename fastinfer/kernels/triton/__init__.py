"""fastinfer.kernels.triton"""

"""fastinfer.kernels"""

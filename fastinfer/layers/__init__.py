"""fastinfer.layers"""

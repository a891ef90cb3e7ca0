"""fastinfer.sampling"""

"""fastinfer.cli"""

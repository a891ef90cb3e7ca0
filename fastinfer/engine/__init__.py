"""fastinfer.engine"""

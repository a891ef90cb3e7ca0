"""fastinfer.server"""

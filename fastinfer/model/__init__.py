"""fastinfer.model"""

"""fastinfer.ops"""

"""fastinfer.bench"""

"""fastinfer.quant"""

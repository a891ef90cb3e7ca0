"""fastinfer.kv_cache"""

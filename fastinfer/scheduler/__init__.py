"""fastinfer.scheduler"""

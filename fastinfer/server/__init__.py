"""The reference OpenAI-compatible server (FastAPI + uvicorn) over ``AsyncEngine``: API keys with
quotas, an audit log, Prometheus metrics and model versions with canary and rollback. Needs the
``serve`` extra (``pip install fastinfer[serve]``)."""

"""The GPU side: the task body, the Chroma engine, the variant cache, the worker's lifecycle.

Importing this package (or any module in it but ``worker.celery``) builds no Celery app, reads no
environment and connects to nothing. ``celery -A worker worker`` finds the app in
``worker.celery``; the engine (``worker.engine``) runs alone, with local paths in and images out.
"""

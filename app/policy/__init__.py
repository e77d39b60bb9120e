"""Policy over the shared state: client keys (auth.py), their limits (limits.py), usage
records (usage.py) and message threads (threads.py)."""

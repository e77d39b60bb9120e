"""The state that workers and hosts share: limits, usage records and message threads, behind
one small interface (store.py) with two engines, SQLite (embedded, the default) and Redis
(several hosts), and a guard (guard.py) that decides what a request gets when the store
cannot answer."""

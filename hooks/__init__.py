"""The DDP communication hook (see hook.py)."""

"""Backup point types: each one an object store (agent.repo.store)."""

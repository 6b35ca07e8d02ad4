"""Adapters to third-party packages; each is imported only by users who installed that package."""

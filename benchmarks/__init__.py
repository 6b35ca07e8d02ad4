"""Benchmarks for jetstream-bridge: ``make bench`` (``python -m benchmarks``).

Scripts, not tests: ``harness`` starts a nats-server, prepares a PostgreSQL database, runs
every scenario of ``scenarios`` several times in fresh processes and reports medians.
"""

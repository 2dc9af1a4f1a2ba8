"""Reliability suite (issue #7): faults, preemption, bad input and concurrency, on real layers and processes.

A package so that its helper modules import as `reliability.*` and never shadow tests/conftest.py.
"""

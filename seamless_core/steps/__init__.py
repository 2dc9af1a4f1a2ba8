"""One function per step: (layers, region, parameters) -> chunks read, computed, written.

Steps validate everything before they create or write anything, so a refused request leaves the
destination untouched; each step is idempotent (rerunning it rewrites the same bytes).
"""

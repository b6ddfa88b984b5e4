"""Test aids: the single-process numpy reference network the engine is checked against, and an
in-memory transport. Production code never imports this package.
"""

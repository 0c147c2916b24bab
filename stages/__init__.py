"""Thin DVC stage scripts: read one params group, call dfq, write outputs atomically."""

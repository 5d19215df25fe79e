"""Backbone architectures, one per file (a registry is added by the backbone zoo)."""

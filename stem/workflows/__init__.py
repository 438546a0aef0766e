"""Durable workflows: multi-step functions whose progress survives crashes (see docs/design.md)."""

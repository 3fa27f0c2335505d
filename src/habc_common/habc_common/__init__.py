"""Shared plain-Python helpers of the habc workspace (no node lives here)."""

"""Simulated bimanual robot and scripted operator of habc."""

"""Bringup of the habc workspace: description, pip launcher, doctor and the habc CLI."""

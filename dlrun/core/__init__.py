"""Mechanics every command shares: errors, atomic files, run directories, checkpoints, provenance, output."""

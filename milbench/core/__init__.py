"""Leaf conventions shared by every layer; imports nothing of milbench (and never torch)."""

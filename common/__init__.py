"""The one shared library of the cookbook: every stage script is built from these pieces."""

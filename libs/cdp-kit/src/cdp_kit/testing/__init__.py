"""Test support: a pytest plugin with fixtures that start real servers."""

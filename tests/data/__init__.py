"""Tests of gpt_neo.data."""

"""Tests of gpt_neo.cli and main.py."""

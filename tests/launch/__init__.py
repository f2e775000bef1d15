"""Tests of gpt_neo.launch."""

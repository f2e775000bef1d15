"""Tests of gpt_neo.config."""

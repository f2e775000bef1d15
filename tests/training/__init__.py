"""Tests of gpt_neo.training."""

"""Tests of gpt_neo.inference."""

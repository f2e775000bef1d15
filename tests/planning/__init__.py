"""Tests of gpt_neo.planning."""

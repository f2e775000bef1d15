"""Tests of gpt_neo.models."""

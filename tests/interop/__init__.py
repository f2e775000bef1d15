"""Tests of gpt_neo.interop."""
